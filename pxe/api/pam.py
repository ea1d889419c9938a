"""A small ctypes binding of libpam: check one user's password against the site's accounts.

Why not a PyPI package: libpam's API for this is five calls, and owning them lets us turn off
libpam's own failure delay (PAM_FAIL_DELAY) - it would block a server thread for seconds; the
service applies its own non-blocking delay and lockout (pxe.api.auth) instead.

The password goes to PAM through the conversation function only; it is never logged.
PAM modules are not all thread-safe (pam_unix uses getspnam), so calls are serialised.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from ctypes import CFUNCTYPE, POINTER, Structure, c_char_p, c_int, c_uint, c_void_p, cast, pointer, sizeof

PAM_SUCCESS = 0
PAM_PROMPT_ECHO_OFF = 1
PAM_PROMPT_ECHO_ON = 2
PAM_RHOST = 4
PAM_FAIL_DELAY = 10
PAM_SILENT = 0x8000
PAM_DISALLOW_NULL_AUTHTOK = 0x0001


class PamMessage(Structure):
    _fields_ = [("msg_style", c_int), ("msg", c_char_p)]


class PamResponse(Structure):
    _fields_ = [("resp", c_void_p), ("resp_retcode", c_int)]


CONV = CFUNCTYPE(c_int, c_int, POINTER(POINTER(PamMessage)), POINTER(POINTER(PamResponse)),
                 c_void_p)
DELAY = CFUNCTYPE(None, c_int, c_uint, c_void_p)


class PamConv(Structure):
    _fields_ = [("conv", CONV), ("appdata_ptr", c_void_p)]


class PamUnavailable(Exception):
    pass


_lock = threading.Lock()
_lib: tuple[ctypes.CDLL, ctypes.CDLL] | None = None


def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("pam") or "libpam.so.0"
        try:
            pam = ctypes.CDLL(name)
        except OSError as exc:
            raise PamUnavailable(f"libpam cannot be loaded ({exc}); install libpam0g") from None
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        pam.pam_start.argtypes = [c_char_p, c_char_p, POINTER(PamConv), POINTER(c_void_p)]
        pam.pam_start.restype = c_int
        pam.pam_end.argtypes = [c_void_p, c_int]
        pam.pam_end.restype = c_int
        pam.pam_authenticate.argtypes = [c_void_p, c_int]
        pam.pam_authenticate.restype = c_int
        pam.pam_acct_mgmt.argtypes = [c_void_p, c_int]
        pam.pam_acct_mgmt.restype = c_int
        pam.pam_set_item.argtypes = [c_void_p, c_int, c_void_p]
        pam.pam_set_item.restype = c_int
        pam.pam_strerror.argtypes = [c_void_p, c_int]
        pam.pam_strerror.restype = c_char_p
        libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
        libc.calloc.restype = c_void_p
        libc.strdup.argtypes = [c_char_p]
        libc.strdup.restype = c_void_p
        _lib = (pam, libc)
    return _lib


@DELAY
def _no_delay(retval: int, usec: int, appdata: int) -> None:
    """Replaces libpam's sleep after a failure; the service delays without blocking a thread."""


def authenticate(user: str, password: str, service: str = "dynprov",
                 rhost: str | None = None) -> tuple[bool, str]:
    """(True, "") if PAM accepts ``user``/``password`` and the account is usable; else
    (False, PAM's reason). Raises PamUnavailable if libpam is missing."""
    pam, libc = _libs()
    secret = password.encode("utf-8")
    name = user.encode("utf-8")

    @CONV
    def conv(n: int, messages: ctypes._Pointer, responses: ctypes._Pointer, _data: int) -> int:
        block = libc.calloc(n, sizeof(PamResponse))
        if not block:
            return 5  # PAM_BUF_ERR
        array = cast(block, POINTER(PamResponse))
        for i in range(n):
            style = messages[i].contents.msg_style
            if style == PAM_PROMPT_ECHO_OFF:
                array[i].resp = libc.strdup(secret)
            elif style == PAM_PROMPT_ECHO_ON:
                array[i].resp = libc.strdup(name)
        responses[0] = array
        return PAM_SUCCESS

    handle = c_void_p()
    conversation = PamConv(conv, None)
    with _lock:
        code = pam.pam_start(service.encode(), name, pointer(conversation), ctypes.byref(handle))
        if code != PAM_SUCCESS:
            return False, f"pam_start: {code}"
        try:
            pam.pam_set_item(handle, PAM_FAIL_DELAY, cast(_no_delay, c_void_p))
            if rhost:
                pam.pam_set_item(handle, PAM_RHOST, cast(c_char_p(rhost.encode()), c_void_p))
            code = pam.pam_authenticate(handle, PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK)
            if code == PAM_SUCCESS:
                code = pam.pam_acct_mgmt(handle, PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK)
            reason = "" if code == PAM_SUCCESS else \
                (pam.pam_strerror(handle, code) or b"PAM error").decode("utf-8", "replace")
        finally:
            pam.pam_end(handle, code)
    return code == PAM_SUCCESS, reason
