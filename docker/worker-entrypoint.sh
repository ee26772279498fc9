#!/bin/sh
# Entry point of the worker image: refuse to start `bocompress worker` without a token (a clear
# message instead of a worker that loops on 401), then exec the command so that it is PID 1 and
# receives SIGTERM itself (the worker finishes or hands back its current task on SIGTERM).
set -eu

if [ "${1:-}" = "bocompress" ] && [ "${2:-}" = "worker" ] && [ -z "${BOCOMPRESS_TOKEN:-}" ]; then
    case " $* " in
        *" --token "*|*" --token="*) ;;
        *)
            echo "error: BOCOMPRESS_TOKEN is empty: create a worker token on the service host with" >&2
            echo "  docker compose run --rm service bocompress token create --role worker --owner ops" >&2
            echo "and put it in .env as BOCOMPRESS_WORKER_TOKEN=... (or pass -e BOCOMPRESS_TOKEN=...)" >&2
            exit 2
            ;;
    esac
fi
exec "$@"
