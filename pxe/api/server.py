"""`pxe-stage api serve`: the HTTPS service, run by pxe.serve's daemon.

It is the same machinery as `pxe-stage serve` (pxe.serve.daemon.Daemon: the socket bound
before the workers fork, uvicorn workers sharing it, restart of a dead worker, clean stop on
SIGTERM), with TFTP off and each HTTP worker running this app over TLS instead of the boot-file
app. A separate process and port because the boot files must stay plain HTTP (iPXE and
busybox wget on the nodes) while this service is HTTPS only, and because users' requests then
never compete with a rack booting.
"""

from __future__ import annotations

import logging
import os

from pxe.api.settings import ApiSettings, require_tls_files
from pxe.config import Config
from pxe.serve import daemon
from pxe.serve import settings as serve_settings

log = logging.getLogger("dynprov.api")


class ApiDaemon(daemon.Daemon):
    def __init__(self, cfg: Config, api: ApiSettings):
        super().__init__(cfg, serve_settings.load(
            cfg, tftp=False, http=True, http_address=api.address, http_port=api.port,
            http_workers=api.workers))
        self.api = api

    def _http_child(self, row: int) -> None:
        from asyncio import constants as asyncio_constants

        import uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol

        from pxe.api.app import create_app
        from pxe.serve.deadlines import guarded

        # uvicorn passes no TLS handshake timeout, so asyncio uses this module constant (60 s):
        # a client that connects and never says hello would hold its socket that long. This is
        # the worker process of this service only.
        asyncio_constants.SSL_HANDSHAKE_TIMEOUT = self.api.timeout
        app = create_app(self.cfg, self.api)
        protocol = guarded(H11Protocol, self.api.timeout, self.api.timeout, self.api.max_per_client)
        config = uvicorn.Config(
            app, http=protocol, ws="none", lifespan="off", loop="asyncio", log_config=None,
            access_log=self.api.access_log, server_header=False, proxy_headers=False,
            ssl_certfile=str(self.api.cert), ssl_keyfile=str(self.api.key),
            timeout_keep_alive=5)
        assert self.http_sock is not None
        uvicorn.Server(config).run(sockets=[self.http_sock])


def run(cfg: Config, api: ApiSettings) -> int:
    require_tls_files(cfg, api)
    os.environ.pop("SUDO_USER", None)
    from pxe.api.auth import Authenticator

    Authenticator(api).secret.ensure()  # before the workers fork: one secret for all
    log.info("REST API on https://%s:%d (%d workers)", api.address, api.port, api.workers)
    return ApiDaemon(cfg, api).run()
