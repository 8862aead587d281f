//! Monotonic time as integer nanoseconds, for the timestamps the hot path subtracts.
//!
//! A `std::time::Instant` keeps seconds and nanoseconds apart, so each difference of two is a
//! call that borrows between them and checks for overflow (~37 instructions), and a proxied
//! transaction took several: each round trip's time, the transaction's, a server's age and
//! idle time at checkout. A [`Mono`] is one `u64` (CLOCK_MONOTONIC, nanoseconds): a difference
//! is a subtraction. Values are absolute, so they compare across threads, event loops and
//! tasks. tokio's timers still take an `Instant`: [`Mono::to_instant`] converts at that edge.

use std::time::Duration;

/// A reading of the monotonic clock, in nanoseconds since an unspecified start (boot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mono(u64);

impl Mono {
    pub fn now() -> Mono {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        // CLOCK_MONOTONIC is never negative; u64 nanoseconds last 584 years of uptime.
        Mono(
            (t.tv_sec as u64)
                .wrapping_mul(1_000_000_000)
                .wrapping_add(t.tv_nsec as u64),
        )
    }

    /// The time from `earlier` to this reading; zero when `earlier` is later.
    pub fn since(self, earlier: Mono) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// This reading moved `d` later (saturating: a timeout of years is "never").
    pub fn saturating_add(self, d: Duration) -> Mono {
        Mono(self.0.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
    }

    /// This moment as a tokio `Instant`, given a pair of readings of both clocks taken together
    /// (the error is the time between those two readings).
    pub fn to_instant(self, now: tokio::time::Instant, now_mono: Mono) -> tokio::time::Instant {
        if self >= now_mono {
            now + self.since(now_mono)
        } else {
            now.checked_sub(now_mono.since(self)).unwrap_or(now)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Mono;
    use std::time::Duration;

    #[test]
    fn differences_are_exact_and_saturate() {
        let a = Mono(5_000_000_000);
        let b = a.saturating_add(Duration::from_millis(1500));
        assert_eq!(b, Mono(6_500_000_000));
        assert_eq!(b.since(a), Duration::from_millis(1500));
        assert_eq!(a.since(b), Duration::ZERO);
        assert_eq!(a.saturating_add(Duration::MAX), Mono(u64::MAX));
    }

    #[test]
    fn follows_the_clock_instant_reads() {
        let (i0, m0) = (std::time::Instant::now(), Mono::now());
        std::thread::sleep(Duration::from_millis(20));
        let (i1, m1) = (std::time::Instant::now(), Mono::now());
        let (di, dm) = (i1 - i0, m1.since(m0));
        assert!(dm >= Duration::from_millis(20), "{dm:?}");
        let skew = di.abs_diff(dm);
        assert!(skew < Duration::from_millis(5), "{di:?} vs {dm:?}");
    }

    #[test]
    fn converts_to_an_instant_either_side_of_now() {
        let (now, mono) = (tokio::time::Instant::now(), Mono::now());
        let later = mono.saturating_add(Duration::from_secs(3));
        assert_eq!(later.to_instant(now, mono), now + Duration::from_secs(3));
        let earlier = Mono(mono.0 - 2_000_000_000);
        assert_eq!(earlier.to_instant(now, mono), now - Duration::from_secs(2));
    }
}
