"""`pxe-stage serve`: the provisioning server a small site runs instead of tftpd-hpa + nginx.

Modules: settings (the [serve] config section), files (root confinement), tftp (TFTP on tftpy's
codec), http (boot files, zero-copy), callhome (POST /report), metrics (shared counters,
Prometheus text), app (the Starlette app), daemon (processes), standard_configs (dnsmasq,
tftpd-hpa and nginx configs for sites that run those instead).
"""
