"""A client older than its server: the REST service's answers carry fields this client does not
know (the server added `boot_set` and `segment` to nodes once); pxe.remote ignores them and still
requires the fields it needs, with one clear error when one is missing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_api_support import PASSWORD, api_site, make_bundle, needs_root, running_server, unix_accounts

from pxe import remote
from pxe.errors import DynprovError

NEWER = "added_by_a_newer_server"


def _with_extra(value: Any) -> Any:
    """Every JSON object in an answer, with one key this client has never heard of."""
    if isinstance(value, dict):
        return {**{k: _with_extra(v) for k, v in value.items()}, NEWER: {"any": [1, 2]}}
    if isinstance(value, list):
        return [_with_extra(v) for v in value]
    return value


class NewerServerClient(remote.Client):
    """The real client over real HTTPS; each JSON answer gets an extra key as it arrives (what
    a newer server would send)."""

    def _send(self, *args: Any, **kw: Any) -> remote.Response:
        res = super()._send(*args, **kw)
        if res.body and res.headers.get("content-type", "").startswith("application/json"):
            res.body = json.dumps(_with_extra(json.loads(res.body))).encode()
        return res


@pytest.mark.integration
@needs_root
def test_an_older_client_ignores_fields_it_does_not_know(tmp_path, monkeypatch):
    with unix_accounts(("admin",)) as acc:
        site = api_site(tmp_path / "site", acc)
        from pxe.inventory import Inventory, build

        Inventory(site.cfg).add([build(site.cfg, {"name": f"n{i}", "macs": f"52:54:00:00:07:0{i}"})
                                 for i in (1, 2)])
        with running_server(site) as srv:
            client = NewerServerClient(srv.url, ca_file=str(srv.cert), user=acc.user("admin"),
                                       password=lambda: PASSWORD,
                                       token_cache=tmp_path / "tokens.json")
            repo = remote.RemoteRepository(client)
            done = repo.upload(make_bundle(tmp_path / "b", "compat-os"), "compat-os")
            assert (done.image.label, done.image.version) == ("compat-os", 1)
            assert NEWER in client.get(f"{remote.V1}/nodes")[0]  # the injection is in place

            assert [n.name for n in remote.nodes(client)] == ["n1", "n2"]
            found, _facts = remote.nodes_with_facts(client, "n2")
            assert found[0].macs == ("52:54:00:00:07:02",)
            assert [i.label for i in remote.images(client)] == ["compat-os"]
            assert remote.image(client, "compat-os").label == "compat-os"
            assert [e.label for e in repo.list()] == ["compat-os"]
            assert [v.version for v in repo.history("compat-os")] == [1]

            from pxe.cli import power as power_cli

            monkeypatch.setattr(remote, "resolve", lambda server, site_config=None: client)
            results = power_cli._remote_status(srv.url, "n[1-2]")
            assert sorted(results) == ["n1", "n2"] and results["n1"].kind == "no-bmc"
            client.close()


@pytest.mark.unit
def test_a_missing_required_field_is_one_clear_error():
    from pxe.images import Image
    from pxe.imageversions import Version
    from pxe.inventory import Node

    node = remote.record(Node, {"name": "n1", "macs": ["52:54:00:00:07:01"], "new": 1}, "node")
    assert node.name == "n1"
    with pytest.raises(DynprovError, match=r"the server's node lacks the field 'macs'"):
        remote.record(Node, {"name": "n1"}, "node")
    with pytest.raises(DynprovError, match=r"the server's image lacks the field 'kernel_sha'"):
        remote.record(Image, {"label": "x"}, "image")
    with pytest.raises(DynprovError, match=r"image version lacks the field 'version'"):
        remote.record(Version, {"label": "x"}, "image version")  # a dataclass
    with pytest.raises(DynprovError, match="not a JSON object"):
        remote.record(Node, ["n1"], "node")
    with pytest.raises(DynprovError, match="rollback answer lacks the field 'current'"):
        remote.fields_of({"previous": 1, "new": 2}, "rollback answer", "previous", "current")
    with pytest.raises(DynprovError, match="not a JSON list"):
        remote.records(Node, {"name": "n1"}, "node")
