"""pxe.records.Record does for the classes on a short command's path what @dataclass did: the same
constructor, defaults, ==, repr, hash, frozen-ness, and fields/asdict/replace (callers rely on them)."""

from __future__ import annotations

import copy
import pickle

import pytest

from pxe import records
from pxe.config import Boot, Config
from pxe.inventory import Node
from pxe.lazyre import lazy
from pxe.records import Factory, Record
from pxe.setboot import RenderReport

pytestmark = pytest.mark.unit


class Point(Record):
    x: int
    y: int = 0
    tags: list[str] = Factory(list)
    secret: str | None = None
    _norepr = ("secret",)


class Point3(Point):
    z: int = 0


class Counter(Record, frozen=False):
    name: str
    hits: int = 0


def test_constructor_defaults_and_errors_as_a_dataclass():
    p = Point(1, tags=["a"])
    assert (p.x, p.y, p.tags, p.secret) == (1, 0, ["a"], None)
    assert Point(1).tags == [] and Point(1).tags is not Point(1).tags  # a new list each time
    with pytest.raises(TypeError):
        Point()  # x is required
    with pytest.raises(TypeError):
        Point(1, nope=2)
    with pytest.raises(TypeError):
        Point(1, 2, [], None, 5)
    assert Boot.http_port == Boot().http_port  # class attributes stay the defaults


def test_frozen_equal_hashable_and_repr_without_hidden_fields():
    a, b = Point(1, 2, secret="s3cret"), Point(1, 2, secret="s3cret")
    assert a == b and a != Point(1, 3)
    assert hash(Point(1, tags=("t",))) == hash(Point(1, tags=("t",)))  # hashable when its values are
    assert Point(1) != Point3(1)  # another class is never equal
    with pytest.raises(AttributeError):
        a.x = 5
    with pytest.raises(AttributeError):
        del a.x
    assert repr(a) == "Point(x=1, y=2, tags=[])" and "s3cret" not in repr(a)
    node = Node("n1", ("52:54:00:00:00:01",), boot_token="tok3n")
    assert "tok3n" not in repr(node) and "boot_token" not in repr(node)


def test_subclass_adds_fields_after_its_base():
    assert records.fields(Point3) == ("x", "y", "tags", "secret", "z")
    assert Point3(1, z=3).z == 3 and Point(1).x == 1  # each class compiles its own constructor


def test_field_without_default_after_one_with_is_refused():
    with pytest.raises(TypeError, match="without a default"):
        class Bad(Record):
            a: int = 0
            b: int


def test_mutable_record_assigns_and_is_not_hashable():
    c = Counter("x")
    c.hits += 1
    assert c == Counter("x", 1)
    with pytest.raises(TypeError):
        hash(c)
    report = RenderReport(True, 1, 0, [], {})
    report.boot_files = 2
    assert report.sources == {} and report.boot_files == 2


def test_fields_asdict_replace():
    p = Point3(1, tags=["a"], z=2)
    assert records.asdict(p) == {"x": 1, "y": 0, "tags": ["a"], "secret": None, "z": 2}
    assert records.asdict(Counter("c", 2)) == {"name": "c", "hits": 2}
    q = records.replace(p, y=7)
    assert (q.x, q.y, q.z) == (1, 7, 2) and p.y == 0
    with pytest.raises(TypeError):
        records.replace(p, nope=1)
    node = Node("n1", ("52:54:00:00:00:01",), boot_token="t")
    assert set(node.public()) == set(records.fields(Node)) - {"boot_token"}


def test_copy_and_pickle_build_the_record_again(tmp_path):
    p = Point3(1, tags=["a"], secret="s", z=2)
    for clone in (copy.copy(p), copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert clone == p and type(clone) is Point3
    assert copy.deepcopy(p).tags is not p.tags
    cfg = Config(path=tmp_path, network=None, dhcp=None, paths=None)  # type: ignore[arg-type]
    assert records.replace(cfg, raw={"a": 1}).raw == {"a": 1} and cfg.raw == {}
    assert "raw=" not in repr(cfg)


def test_lazy_pattern_compiles_on_first_use_only():
    pattern = lazy(r"n(\d+)")
    assert pattern._compiled is None  # nothing compiled at import
    assert pattern.fullmatch("n12").group(1) == "12"
    assert pattern.sub("x", "n1 n2") == "x x" and pattern.findall("n1 n2") == ["1", "2"]
    assert pattern.split("an1b") == ["a", "1", "b"] and pattern.search("an3").group(1) == "3"
    assert pattern.match("q") is None and pattern.pattern == r"n(\d+)"
    assert [m.group(1) for m in pattern.finditer("n4 n5")] == ["4", "5"]


def test_modules_on_the_path_compile_no_pattern_at_import():
    import subprocess
    import sys

    code = ("import re\n"
            "from pxe import hwfacts, nodeset, templatefiles, validate\n"
            "from pxe.lazyre import lazy\n"
            "mods = (hwfacts, nodeset, templatefiles, validate)\n"
            "lazies = [v for m in mods for v in vars(m).values() if isinstance(v, lazy)]\n"
            "eager = [n for m in mods for n, v in vars(m).items() if isinstance(v, re.Pattern)]\n"
            "cached = {key[1] for key in re._cache}\n"
            "print(len(lazies), eager, [p.pattern for p in lazies if p.pattern in cached])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout.split(" ", 1)
    assert int(out[0]) >= 14 and out[1].strip() == "[] []"
