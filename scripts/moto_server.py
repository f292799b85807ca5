"""moto's S3 server (as `moto_server -H HOST -p PORT`), with each request handled atomically.

moto 5.2 checks a conditional PUT's precondition (If-None-Match / If-Match) and then writes,
in a threaded server without a lock, so two racing conditional PUTs of one key can both
succeed; real S3, MinIO and Ceph make the check and the write one step. Sluice's commit log
and leases rely on that, and its tests race writers on purpose, so this launcher serialises
requests with one lock around moto's WSGI application. Run it with the Python that has moto
(scripts/setup.sh --test installs it into ~/.cache/sluice-tools/venv).
"""

import argparse
import threading

from werkzeug.serving import run_simple

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serialised(environ, start_response):
        with lock:
            # moto builds whole responses: materialise the body inside the lock.
            return list(app(environ, start_response))

    run_simple(args.host, args.port, serialised, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
