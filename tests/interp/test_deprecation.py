"""The one mechanism behind every renamed keyword, field, key and function (interp.deprecation)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import ClassVar

import pytest

from interp.deprecation import (
    RenamedKeys,
    renamed_fields,
    renamed_function,
    renamed_keywords,
)
from interp.errors import InputError


class Boom(Exception):
    pass


@renamed_keywords({"old": "new"}, error=Boom)
def f(a, new=1, *, other=0):
    return a, new, other


def test_renamed_keyword_warns_at_the_caller_and_refuses_both():
    with pytest.warns(DeprecationWarning, match=r"f\(\): 'old' is deprecated, use 'new'") as caught:
        assert f(0, old=5) == f(0, new=5) == (0, 5, 0)
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name never warns
        f(0, new=5, other=1)
    with pytest.raises(Boom, match="both old= and new="):
        f(0, old=5, new=5)
    with pytest.raises(Boom, match="both old= and new="):
        f(0, 5, old=5)  # the new one given positionally


@renamed_fields({"size": "width"})
@dataclasses.dataclass
class Box:
    width: int = 1


def test_renamed_field_reads_and_writes_the_new_one():
    with pytest.warns(DeprecationWarning, match="Box: 'size' is deprecated, use 'width'"):
        box = Box(size=3)
    assert box == Box(width=3) and Box._renamed == {"size": "width"}
    with pytest.warns(DeprecationWarning):
        box.size = 4
    assert box.width == 4 and "size" not in vars(box)
    with pytest.warns(DeprecationWarning):
        assert box.size == 4
    with pytest.raises(InputError, match="both size= and width="):
        Box(size=1, width=1)


class Report(RenamedKeys):
    _renamed: ClassVar[dict[str, str]] = {"old": "new"}
    _owner: ClassVar[str] = "the report"


def test_renamed_keys_store_once_and_read_the_old_key():
    rep = Report(new=1, other=2)
    with pytest.warns(DeprecationWarning, match="the report: 'old' is deprecated, use 'new'"):
        assert rep["old"] == 1
    assert "old" not in rep and rep.get("old") is None and list(rep) == ["new", "other"]
    assert json.loads(json.dumps(rep)) == {"new": 1, "other": 2}
    with pytest.raises(KeyError):
        rep["missing"]
    with pytest.raises(KeyError):
        Report(other=2)["old"]  # the new key is absent too


def test_renamed_function_gives_the_same_result():
    def area(w, h):
        return w * h

    old = renamed_function("surface", area, owner="shapes")
    with pytest.warns(DeprecationWarning, match="shapes: 'surface' is deprecated, use 'area'"):
        assert old(2, h=3) == area(2, 3)
    assert old.__name__ == "surface"
