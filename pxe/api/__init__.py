"""The REST service (`pxe-stage api serve`): images, nodes, pools, power status and provisioning
runs over HTTPS, for users and portals without a shell on the provisioning server.

Modules: settings (the [api] section), pam (a small ctypes binding of libpam), auth (HTTP Basic
against PAM or a bcrypt password file, signed bearer tokens, lockout), app (the Starlette routes),
web (the status page and its JSON), openapi (/openapi.json), tls (self-signed pairs for a test
site), server (the HTTPS daemon, built on pxe.serve.daemon). The client side is pxe/remote.py.
"""
