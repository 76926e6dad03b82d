#!/usr/bin/env bash
# System packages some tests use: PostgreSQL (the load test) and Chromium with its driver (the browser
# test). Installed with Debian's apt-get when this runs as root on Debian; otherwise it says what is
# missing and those tests are skipped with that reason (never passed).
set -u
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need[*]} with apt-get"
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
        exit 0
    fi
    echo "WARNING: apt-get could not install ${need[*]}; the tests that need them will be skipped" >&2
else
    echo "WARNING: ${need[*]} missing and not installable here (needs root and apt-get); the tests that need them will be skipped" >&2
fi
exit 0
