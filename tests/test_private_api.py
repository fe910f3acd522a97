"""Private torch and transformers APIs live in ``esft_rs.private_api`` alone: each piece,
removed, takes its public path with one warning line and the same results; no other
module of the package touches them."""

from __future__ import annotations

import ast
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import esft_rs
from esft_rs import private_api

PACKAGE = Path(esft_rs.__file__).parent
#: Names that are private to torch or transformers (attributes, or strings given to
#: getattr/hasattr): only private_api.py may use them.
PRIVATE_NAMES = {
    "_get_fsdp_state", "_fsdp_param_groups", "_all_gather_output_fn", "_sharded_local_tensor",
    "_default_all_gather_output_fn", "_unsafe_set_version_counter", "_set_unshard_async_op",
    "init_all_gather_outputs", "alloc_all_gather_outputs", "all_gather_inputs",
    "all_gather_outputs", "_get_dtype_plan", "_weight_conversions", "_is_hf_initialized",
    "_init_weights", "_parameters", "_buffers", "_non_persistent_buffers_set", "_version",
    "_C", "compute_local_shape_and_global_offset",
}
LIBRARIES = ("torch", "transformers")


def private_uses(path: Path) -> Iterator[str]:
    """``line: what`` for every private name or private-module import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        found = None
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_NAMES:
            found = node.attr
        elif isinstance(node, ast.Constant) and node.value in PRIVATE_NAMES:
            found = repr(node.value)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                a.name for a in node.names]
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            for m in modules:
                parts = m.split(".")
                if parts[0] in LIBRARIES and (any(p.startswith("_") for p in parts)
                                              or any(n in PRIVATE_NAMES for n in names)):
                    found = f"import {m}"
        if found is not None:
            yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {found}"


def test_no_module_but_private_api_uses_private_apis() -> None:
    uses = [u for p in sorted(PACKAGE.rglob("*.py")) if p.name != "private_api.py"
            for u in private_uses(p)]
    assert uses == []
    assert list(private_uses(PACKAGE / "private_api.py"))  # the check sees them there


@pytest.fixture
def probed() -> Iterator[None]:
    """Pieces probed afresh in the test, and again after it (what it removed comes back)."""
    private_api.clear()
    yield
    private_api.clear()


@pytest.fixture
def fsdp_pieces(probed: None) -> None:
    """A torch with every FSDP2 piece, which the test then removes (the floor's lacks
    some: ``make test-floor`` trains with its own fallbacks instead)."""
    from torch.distributed.fsdp import FSDPModule

    missing = [n for n in ("set_custom_all_gather", "set_reduce_scatter_unused_params")
               if not hasattr(FSDPModule, n)]
    if missing:
        pytest.skip(f"torch {torch.__version__}: FSDPModule has no {', '.join(missing)}")


def one_warning(caught: list[warnings.WarningMessage], piece: str) -> None:
    lines = [str(w.message) for w in caught if piece in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0], lines


def test_fsdp_pieces_fall_back(monkeypatch: pytest.MonkeyPatch, fsdp_pieces: None) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    from esft_rs.training import chunked_gather

    assert private_api.can_set_all_gather() and private_api._fsdp_in_place()
    for owner, name in ((_fsdp_param.FSDPParam, "alloc_all_gather_outputs"),
                        (torch._C._autograd, "_unsafe_set_version_counter")):
        with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m.delattr(owner, name)
            private_api.clear()
            # install asks no group: the flat way for every module (none here)
            assert private_api.in_place_group(object()) is None
            assert private_api.can_set_all_gather()
        one_warning(caught, "fsdp_in_place_gather")
        assert name in str(caught[0].message)
    with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.delattr(FSDPModule, "set_custom_all_gather")
        m.delattr(FSDPModule, "_set_unshard_async_op")
        m.delattr(FSDPModule, "set_reduce_scatter_unused_params")
        private_api.clear()
        model = torch.nn.Linear(2, 2)
        chunked_gather.install(model)  # stock FSDP2: nothing to install
        private_api.set_unshard_async(model)  # gathers wait: nothing to set
        assert not private_api.set_reduce_unused(model)  # the caller gives zeros itself
    one_warning(caught, "fsdp_chunked_gather")
    one_warning(caught, "fsdp_async_unshard")
    one_warning(caught, "fsdp_unused_params")


@pytest.mark.parametrize(("shape", "mesh", "placements", "want"), [
    # FSDP2's dim-0 shards, as torch.chunk splits: ceil-sized, the last short or empty
    ((5, 3), (2,), ("S0",), [((3, 3), (0, 0)), ((2, 3), (3, 0))]),
    ((2, 4), (4,), ("S0",), [((1, 4), (0, 0)), ((1, 4), (1, 0)), ((0, 4), (2, 0)),
                             ((0, 4), (2, 0))]),
    ((6,), (3,), ("R",), [((6,), (0,))] * 3),
    # torch's own example: (Shard(1), Shard(1)) on a 2 x 2 mesh
    ((2, 5), (2, 2), ("S1", "S1"), [((2, 2), (0, 0)), ((2, 1), (0, 2)), ((2, 1), (0, 3)),
                                    ((2, 1), (0, 4))]),
])
def test_dtensor_offset_public_path(shape: tuple[int, ...], mesh: tuple[int, ...],
                                    placements: tuple[str, ...], want: list) -> None:
    from torch.distributed.tensor import Replicate, Shard

    made = [Shard(int(p[1])) if p.startswith("S") else Replicate() for p in placements]
    coordinates = [(r,) if len(mesh) == 1 else (r // mesh[1], r % mesh[1])
                   for r in range(len(want))]
    got = [private_api.shard_extent(shape, mesh, c, made) for c in coordinates]
    assert got == want


def test_dcp_keys_fall_back(monkeypatch: pytest.MonkeyPatch, probed: None) -> None:
    saved = {"optimizer.state.w.exp_avg", "optimizer.param_groups.0.lr", "model.w"}
    assert private_api.had_state(saved, "optimizer.state.w") is True
    assert private_api.had_state(saved, "optimizer.state.v") is False
    assert private_api.nested_keys({"ep.a.b", "ep.c", "x"}, "ep") == {"a.b", "c"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert private_api.had_state({"optimizer/state/w"}, "optimizer.state.w") is None
    one_warning(caught, "dcp_flat_keys")


def test_module_buffers_public_path(monkeypatch: pytest.MonkeyPatch) -> None:
    m = torch.nn.BatchNorm1d(3)
    m.register_buffer("inv_freq", torch.ones(2), persistent=False)
    want = private_api.non_persistent_buffers(m)
    monkeypatch.setenv("ESFT_RS_TEST_HIDE_PRIVATE", "module_buffers")
    assert private_api.non_persistent_buffers(m) == want == {"inv_freq"}


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_transformers_load_without_private_pieces(tmp_path: Path, family: str,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  probed: None) -> None:
    """The model loads with transformers' dtype plan and nn.Module's buffer set hidden:
    the same tensors, buffers (rotary inv_freq) included; a missing dtype plan is one
    warning line."""
    pytest.importorskip("transformers")
    from esft_rs.models import load_model
    from hf_tiny import save

    root = save(family, tmp_path / family)
    want = load_model(root).state_dict()
    buffers = dict(load_model(root).named_buffers())
    monkeypatch.setenv("ESFT_RS_TEST_HIDE_PRIVATE", "hf_dtype_plan,module_buffers")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(root)
    one_warning(caught, "hf_dtype_plan")
    got = model.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k].float(), want[k].float()), k
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k


@pytest.mark.multiprocess
def test_fsdp_without_private_apis_trains_as_with_them(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every private piece hidden (stock FSDP2 all-gather, computed DTensor offsets, all
    optimizer state, public buffer lists) in both ranks: the same adapter, bit for bit."""
    from conftest import BUILTIN_EXPERTS
    from esft_rs.models import init_model, save_model
    from test_train_fsdp import losses, train
    from train_fakes import plus_chat

    save_model(init_model("tiny", seed=0), tmp_path / "base")
    (tmp_path / "task.jsonl").write_text(plus_chat(10, 4))
    BUILTIN_EXPERTS.save(tmp_path / "experts.json")
    normal = train(tmp_path, tmp_path / "normal", 2)
    monkeypatch.setenv("ESFT_RS_TEST_HIDE_PRIVATE", "all")
    public = train(tmp_path, tmp_path / "public", 2)
    a, b = load_file(normal / "adapter.safetensors"), load_file(public / "adapter.safetensors")
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(losses(normal), losses(public))


def test_a_changed_fsdp_copy_out_takes_the_flat_way(fsdp_pieces: None) -> None:
    """_in_place_fits raised on a parameter group whose copy-out FSDP2 had changed; now
    that group gathers the flat way, with one warning line."""
    from types import SimpleNamespace

    group = SimpleNamespace(_all_gather_output_fn=lambda *a: None, fsdp_params=[])
    module = SimpleNamespace(_get_fsdp_state=lambda: SimpleNamespace(_fsdp_param_groups=[group]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert private_api.in_place_group(module) is None
    one_warning(caught, "fsdp_in_place_gather")
    assert "another copy-out" in str(caught[0].message)


def test_transformers_pieces_without_their_private_attributes(probed: None) -> None:
    from types import SimpleNamespace

    from esft_rs.errors import EsftError

    bare = SimpleNamespace()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert private_api.set_weight_conversions(bare, None) is False
        assert private_api.dtype_plan(bare, torch.float32) is None
    one_warning(caught, "hf_weight_conversions")
    one_warning(caught, "hf_dtype_plan")
    assert not hasattr(bare, "_weight_conversions")  # nothing changed
    with pytest.raises(EsftError, match="has no _init_weights") as info:
        private_api.init_weights(bare, torch.nn.Linear(1, 1))
    assert "\n" not in str(info.value)
