#!/usr/bin/env bash
# Installs the real client drivers that tests/drivers.rs runs through pgweir, into
# target/drivers (kept between runs; a second run only checks):
#   asyncpg and psycopg 3 from PyPI (in a venv), node-postgres from npm, pgJDBC from Debian
#   (libpostgresql-jdbc-java; Maven Central is not reachable here), and a Java runtime if none.
# Needs python3 with venv, npm, and apt-get (as root or with sudo) for the two Debian packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
dir=target/drivers
mkdir -p "$dir"

if ! "$dir/venv/bin/python" -c 'import asyncpg, psycopg' 2>/dev/null; then
    python3 -m venv "$dir/venv"
    "$dir/venv/bin/pip" install --quiet --disable-pip-version-check 'asyncpg==0.32.*' 'psycopg[binary]==3.3.*'
fi

if [ ! -f "$dir/node/node_modules/pg/package.json" ]; then
    mkdir -p "$dir/node"
    npm install --prefix "$dir/node" --no-audit --no-fund --silent 'pg@8'
fi

missing=()
[ -f /usr/share/java/postgresql.jar ] || missing+=(libpostgresql-jdbc-java)
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
