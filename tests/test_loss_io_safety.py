"""A learned-loss file is untrusted data: loading it imports no untrusted module and
allocates nothing its constructor arguments ask for before the sizes are checked."""

from __future__ import annotations

import resource
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

import metaloss.losses.io as lio
from metaloss.losses.base import ParametricLoss
from metaloss.losses.io import (
    FORMAT,
    CorruptLossFile,
    UntrustedLossClass,
    load_learned_loss,
    save_learned_loss,
)
from metaloss.losses.logit_adjusted import LogitAdjusted
from metaloss.losses.mlp import ML3Loss
from metaloss.losses.poly import PolyN
from metaloss.losses.smoothing import LearnedSmoothing

MODULE_SOURCE = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")  # the visible side effect of an import

import torch
from metaloss.losses.base import ParametricLoss


class SideEffectLoss(ParametricLoss):
    kinds = ("regression",)

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(scale=scale)
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))

    def forward(self, pred, target, **_):
        return self.scale * ((pred - target) ** 2).mean(-1)
"""


@pytest.fixture
def side_effect_module(tmp_path, monkeypatch):
    """(module name, marker path): a loss module on sys.path that writes a marker when imported."""
    created: list[str] = []

    def make(name: str | None = None) -> tuple[str, Path]:
        name = name or f"sidefx_{uuid.uuid4().hex[:10]}"
        marker = tmp_path / f"{name}.imported"
        mod_dir = tmp_path / "mods"
        mod_dir.mkdir(exist_ok=True)
        (mod_dir / f"{name}.py").write_text(MODULE_SOURCE.format(marker=str(marker)))
        monkeypatch.syspath_prepend(str(mod_dir))
        created.append(name)
        return name, marker

    yield make
    for name in created:
        sys.modules.pop(name, None)


def write_blob(path: Path, target, init_kwargs=None, state_dict=None) -> Path:
    torch.save(
        {
            "format": FORMAT,
            "target": target,
            "init_kwargs": init_kwargs or {},
            "state_dict": state_dict or {},
            "meta": {},
        },
        path,
    )
    return path


def rewrite(path: Path, **changes) -> Path:
    """Edit a saved file the way an attacker (or a bad merge) would."""
    blob = torch.load(path, weights_only=True)
    blob.update(changes)
    torch.save(blob, path)
    return path


# --- imports -----------------------------------------------------------------------------


def test_untrusted_module_is_never_imported(tmp_path, side_effect_module):
    name, marker = side_effect_module()
    f = write_blob(
        tmp_path / "l.pt", f"{name}.SideEffectLoss", {"scale": 2.0}, {"scale": torch.tensor(2.0)}
    )
    with pytest.raises(UntrustedLossClass, match=rf"{name}.*trusted_modules=\[{name}\]"):
        load_learned_loss(f)
    assert not marker.exists() and name not in sys.modules  # its top-level code never ran

    loss = load_learned_loss(f, trusted_modules=[name])
    assert marker.exists() and type(loss).__name__ == "SideEffectLoss"
    assert float(loss.scale) == 2.0 and not loss.scale.requires_grad


def test_a_bare_string_trusts_that_one_module(tmp_path, side_effect_module):
    name, _ = side_effect_module()
    f = write_blob(tmp_path / "l.pt", f"{name}.SideEffectLoss", {}, {"scale": torch.tensor(1.0)})
    assert type(load_learned_loss(f, trusted_modules=name)).__name__ == "SideEffectLoss"


def test_an_already_imported_module_still_needs_trust(tmp_path, side_effect_module):
    name, marker = side_effect_module()
    __import__(name)
    assert marker.exists()
    f = write_blob(tmp_path / "l.pt", f"{name}.SideEffectLoss", {}, {"scale": torch.tensor(1.0)})
    with pytest.raises(UntrustedLossClass):
        load_learned_loss(f)


def test_prefix_tricks_are_refused(tmp_path, side_effect_module):
    name, marker = side_effect_module("metaloss_evil")
    f = write_blob(tmp_path / "l.pt", f"{name}.SideEffectLoss", {}, {"scale": torch.tensor(1.0)})
    with pytest.raises(UntrustedLossClass, match="metaloss_evil"):
        load_learned_loss(f)
    with pytest.raises(UntrustedLossClass):
        load_learned_loss(f, trusted_modules=["metaloss_e", "metaloss.evil"])
    assert not marker.exists()


@pytest.mark.parametrize(
    "target", ["os.system", "builtins.eval", "subprocess.Popen", "torch.nn.Linear"]
)
def test_classes_outside_metaloss_are_refused_without_import(tmp_path, target):
    with pytest.raises(UntrustedLossClass, match="trusted_modules"):
        load_learned_loss(write_blob(tmp_path / "l.pt", target))


@pytest.mark.parametrize(
    "target",
    [
        "ML3Loss",
        "",
        "metaloss.losses.mlp.ML3Loss; import os",
        "metaloss..mlp.ML3Loss",
        "metaloss/losses/mlp.ML3Loss",
        "metaloss.losses.mlp.__class__",
        "metaloss.losses.mlp.ML3Loss ",
        "metaloss.lossés.ML3Loss",
        42,
        None,
    ],
)
def test_targets_that_are_not_plain_dotted_names_are_refused(tmp_path, target):
    with pytest.raises(CorruptLossFile, match="not a dotted name"):
        load_learned_loss(write_blob(tmp_path / "l.pt", target))


def test_attributes_of_metaloss_modules_do_not_lead_outside(
    tmp_path, side_effect_module, monkeypatch
):
    f = write_blob(
        tmp_path / "l.pt",
        "metaloss.losses.io.torch.nn.Linear",
        {"in_features": 1, "out_features": 1},
    )
    with pytest.raises(CorruptLossFile, match="cannot be imported"):
        load_learned_loss(f)
    # a re-exported package's lazy submodules are never reached (numpy.f2py is lazy)
    import sys

    before = "numpy.f2py" in sys.modules
    f = write_blob(tmp_path / "l.pt", "metaloss.metatest.np.f2py.Foo", {})
    with pytest.raises(CorruptLossFile, match="cannot be imported"):
        load_learned_loss(f)
    assert ("numpy.f2py" in sys.modules) == before
    name, _ = side_effect_module()
    monkeypatch.setattr(lio, "Smuggled", __import__(name).SideEffectLoss, raising=False)
    f = write_blob(
        tmp_path / "l.pt", "metaloss.losses.io.Smuggled", {}, {"scale": torch.tensor(1.0)}
    )
    with pytest.raises(UntrustedLossClass, match=name):
        load_learned_loss(f)


def test_missing_metaloss_class_is_a_clear_error(tmp_path):
    with pytest.raises(CorruptLossFile, match="cannot be imported"):
        load_learned_loss(write_blob(tmp_path / "l.pt", "metaloss.losses.mlp.NoSuchLoss"))
    with pytest.raises(CorruptLossFile, match="cannot be imported"):
        load_learned_loss(write_blob(tmp_path / "l.pt", "metaloss.no_such_module.Loss"))


@pytest.mark.parametrize("bad", ["", "my-losses", "my_losses.", "*", 3])
def test_trusted_modules_must_be_module_names(tmp_path, bad):
    f = save_learned_loss(PolyN(degree=2), tmp_path / "l.pt")
    with pytest.raises(ValueError, match="trusted_modules"):
        load_learned_loss(f, trusted_modules=[bad])


# --- sizes -------------------------------------------------------------------------------


def test_huge_hidden_sizes_are_refused_before_allocation(tmp_path):
    f = rewrite(
        save_learned_loss(ML3Loss(), tmp_path / "ml3.pt"),
        init_kwargs={**ML3Loss().init_kwargs, "hidden": [10**9]},
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    # out of the range metaloss.validate declares for ML3Loss.hidden: refused before any build
    with pytest.raises(
        CorruptLossFile, match=r"init_kwargs.hidden = \[1000000000\]: must be .*in \[1, 4096\]"
    ):
        load_learned_loss(f)
    # in range layer by layer, too big in all: refused by the shape-only (meta-device) build
    f = rewrite(f, init_kwargs={**ML3Loss().init_kwargs, "hidden": [4096] * 5})
    with pytest.raises(
        CorruptLossFile, match="would hold 67,[0-9,]+ elements, over the limit of 50,000,000"
    ):
        load_learned_loss(f)
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 500_000  # not 8 GB


def test_sizes_from_constructor_arguments_are_capped(tmp_path):
    # The saved tensors are tiny; only the constructor argument is huge.
    f = rewrite(
        save_learned_loss(LogitAdjusted(num_classes=3), tmp_path / "la.pt"),
        init_kwargs={"num_classes": 10**9},
    )
    start = time.perf_counter()
    with pytest.raises(
        CorruptLossFile,
        match=r"init_kwargs.num_classes = 1000000000: must be an integer in \[2, 100000\]",
    ):
        load_learned_loss(f)
    f = rewrite(f, init_kwargs={"num_classes": 100_000})
    with pytest.raises(CorruptLossFile, match="300,000 elements, over the limit of 1,000"):
        load_learned_loss(f, max_numel=1000)
    assert time.perf_counter() - start < 2.0


def test_buffers_count_towards_the_cap(tmp_path):
    f = save_learned_loss(PolyN(degree=3), tmp_path / "p.pt")  # epsilon [3] + powers buffer [3]
    assert isinstance(load_learned_loss(f, max_numel=6), PolyN)
    with pytest.raises(CorruptLossFile, match="would hold 6 elements"):
        load_learned_loss(f, max_numel=5)


def test_saved_tensors_are_capped_for_classes_not_buildable_on_meta(tmp_path):
    # LearnedSmoothing reads a tensor value in __init__, so only the saved sizes bound it.
    f = save_learned_loss(LearnedSmoothing(per_class=True, num_classes=10), tmp_path / "s.pt")
    assert isinstance(load_learned_loss(f), LearnedSmoothing)
    with pytest.raises(CorruptLossFile, match="10 elements"):
        load_learned_loss(f, max_numel=5)


def test_shape_mismatch_is_refused(tmp_path):
    f = rewrite(
        save_learned_loss(PolyN(degree=2), tmp_path / "p.pt"),
        init_kwargs={"degree": 3, "init_epsilon": [0.0, 0.0, 0.0]},
    )
    with pytest.raises(CorruptLossFile, match=r"epsilon: saved \(2,\), class builds \(3,\)"):
        load_learned_loss(f)
    f = rewrite(
        f,
        init_kwargs={"degree": 2, "init_epsilon": [0.0, 0.0]},
        state_dict={"epsilon": torch.zeros(2), "extra": torch.zeros(1)},
    )
    with pytest.raises(CorruptLossFile, match=r"unexpected \['extra'\]"):
        load_learned_loss(f)


@pytest.mark.parametrize(
    "init_kwargs,match",
    [
        ({"hidden": torch.tensor([10, 10])}, "hold a Tensor"),
        ({"hidden": [1] * 20_000}, "more than 10,000"),
        ({"hidden": {1: 2}}, "non-string keys"),
        ({"hidden": [[[[[[[[[[1]]]]]]]]]]}, "deeper"),
    ],
)
def test_init_kwargs_must_be_small_plain_values(tmp_path, init_kwargs, match):
    f = rewrite(save_learned_loss(ML3Loss(), tmp_path / "ml3.pt"), init_kwargs=init_kwargs)
    with pytest.raises(CorruptLossFile, match=match):
        load_learned_loss(f)


def test_state_dict_must_hold_named_tensors(tmp_path):
    f = rewrite(
        save_learned_loss(PolyN(degree=2), tmp_path / "p.pt"), state_dict={"epsilon": [0.0, 0.0]}
    )
    with pytest.raises(CorruptLossFile, match="not named tensors"):
        load_learned_loss(f)


# --- ordinary files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ML3Loss(hidden=(8, 8)),
        lambda: PolyN(degree=2, init_epsilon=[1.0, 0.5]),
        lambda: LogitAdjusted(num_classes=4),
    ],
)
def test_ordinary_losses_round_trip(tmp_path, make):
    torch.manual_seed(0)
    loss = make()
    with torch.no_grad():
        for p in loss.parameters():
            p.add_(0.1 * torch.randn_like(p))
    back = load_learned_loss(save_learned_loss(loss, tmp_path / "l.pt", loss_name="x", steps=3))
    assert type(back) is type(loss) and back.meta == {"loss_name": "x", "steps": 3}
    for (k, a), (k2, b) in zip(loss.state_dict().items(), back.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b)
    pred, target = torch.randn(6, 4), torch.randint(0, 4, (6,))
    torch.testing.assert_close(back(pred, target), loss(pred, target).detach())
    assert isinstance(back, ParametricLoss) and not any(p.requires_grad for p in back.parameters())


def test_non_finite_parameters_are_refused(tmp_path):
    from metaloss.losses.io import save_learned_loss
    from metaloss.losses.poly import PolyN

    loss = PolyN(degree=2)
    with torch.no_grad():
        loss.epsilon[0] = float("nan")
    save_learned_loss(loss, tmp_path / "nan.pt")
    with pytest.raises(CorruptLossFile, match=r"\['epsilon'\] hold NaN/inf"):
        load_learned_loss(tmp_path / "nan.pt")


def test_huge_polyn_degree_is_refused_without_allocating(tmp_path):
    import time

    f = write_blob(tmp_path / "l.pt", "metaloss.losses.poly.PolyN", {"degree": 10**9}, {})
    t0 = time.time()
    with pytest.raises(CorruptLossFile, match=r"degree (= 1000000000: )?must be an integer in"):
        load_learned_loss(f)
    assert time.time() - t0 < 5


# --- issue 15: limits before allocation, values only -------------------------------------


def _deflated_file(path: Path, numel: int, sentinel: int = 123_457) -> Path:
    """A well-formed learned-loss file (PolyN) whose one tensor holds ``numel`` float32 zeros,
    deflated: the file is small, its contents are ``4 * numel`` bytes. Built without ever
    holding the tensor: torch.save of a ``sentinel``-sized tensor, the size patched in the
    pickle (a 4-byte BININT), the storage streamed as zeros."""
    import io
    import struct
    import zipfile

    buf = io.BytesIO()
    torch.save(
        {
            "format": FORMAT,
            "target": "metaloss.losses.poly.PolyN",
            "init_kwargs": {"degree": 2},
            "state_dict": {"epsilon": torch.zeros(sentinel)},
            "meta": {},
        },
        buf,
    )
    src = zipfile.ZipFile(buf)
    chunk = bytes(16 * 2**20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                with out.open(info.filename, "w", force_zip64=True) as f:
                    left = 4 * numel
                    while left > 0:
                        f.write(chunk[: min(left, len(chunk))])
                        left -= len(chunk)
                continue
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.count(struct.pack("<i", sentinel)) >= 2  # storage size and tensor shape
                data = data.replace(struct.pack("<i", sentinel), struct.pack("<i", numel))
            out.writestr(info.filename, data)
    return path


def test_a_deflated_file_is_read_like_a_stored_one(tmp_path):
    """The archive check reads sizes, not formats: a small deflated file still loads (and
    today's torch.load does decompress deflated entries: the limit is what stops a bomb)."""
    f = _deflated_file(tmp_path / "small.pt", numel=2)
    assert f.stat().st_size < 2_000
    assert isinstance(load_learned_loss(f), PolyN)


def test_a_compressed_file_over_the_limit_is_refused_before_decompression(tmp_path):
    """1.27 GB of float32 zeros deflated into a ~5 MB file: refused from the zip directory,
    without the gigabyte ever being allocated (before: torch.load allocated it first)."""
    f = _deflated_file(tmp_path / "bomb.pt", numel=317_500_000)
    assert f.stat().st_size < 20 * 2**20
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.perf_counter()
    with pytest.raises(
        CorruptLossFile,
        match=rf"bomb.pt: unpacks to 1,270,000,[0-9,]+ bytes .*over the limit of "
        rf"{lio.max_file_bytes():,} bytes.*max_numel=50,000,000.*before decompressing",
    ):
        load_learned_loss(f)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100_000  # not 1.27 GB


def test_a_file_within_the_default_limit_but_over_a_smaller_one(tmp_path):
    f = _deflated_file(tmp_path / "mid.pt", numel=5_000_000)  # 20 MB unpacked
    with pytest.raises(CorruptLossFile, match="unpacks to 20,00[0-9,]+ bytes"):
        load_learned_loss(f, max_numel=1_000)
    with pytest.raises(CorruptLossFile, match="saved parameters hold 5,000,000 elements"):
        load_learned_loss(f, max_numel=4_000_000)  # the archive fits; the tensor count does not


@pytest.mark.parametrize(
    "tensor,match",
    [
        (lambda: torch.empty(2, device="meta"), "meta-device tensor"),
        (lambda: torch.zeros(2).to_sparse(), "sparse_coo tensor"),
        (
            lambda: torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8),
            "quantized tensor",
        ),
        (lambda: torch.zeros(2, dtype=torch.complex64), r"complex \(complex64\)"),
        (
            lambda: torch.zeros(2, dtype=torch.int64),
            "epsilon'\\] has dtype int64, but PolyN holds it as floats",
        ),
        (lambda: torch.zeros(2, dtype=torch.bool), "has dtype bool, but PolyN holds it as floats"),
    ],
)
def test_unsupported_tensors_get_a_clear_error(tmp_path, tensor, match):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notes on quantized/typed storages
        f = rewrite(
            save_learned_loss(PolyN(degree=2), tmp_path / "p.pt"), state_dict={"epsilon": tensor()}
        )
        with pytest.raises(CorruptLossFile, match=rf"p.pt: .*{match}"):
            load_learned_loss(f)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"extra": 1}, r"unknown key 'extra' in the file"),
        ({"meta": {"steps": 3, "note": "x"}}, r"unknown key 'meta.note' in the file"),
        ({"meta": ["not", "a", "dict"]}, "meta must be a dict"),
        (
            {"init_kwargs": {"degree": 2, "bogus": 1}},
            r"unknown key 'init_kwargs.bogus': PolyN takes \['degree', 'init_epsilon'\]",
        ),
    ],
)
def test_unknown_keys_are_refused_naming_file_and_key(tmp_path, change, match):
    f = rewrite(save_learned_loss(PolyN(degree=2), tmp_path / "p.pt"), **change)
    with pytest.raises(CorruptLossFile, match=rf"p.pt: {match}"):
        load_learned_loss(f)


@pytest.mark.parametrize(
    "change,match",
    [
        (
            {"init_kwargs": {"hidden": [8], "init": {"_target_": "os.system", "command": "true"}}},
            r"init_kwargs.init._target_: Hydra key '_target_' refused",
        ),
        (
            {"meta": {"setup": {"task": {"target": "x", "config": {"n": {"_partial_": True}}}}}},
            r"meta.setup.task.config.n._partial_: Hydra key",
        ),
        (
            {"meta": {"loss_name": "${oc.env:HOME}"}},
            r"meta.loss_name = '\$\{oc.env:HOME\}': interpolations",
        ),
        ({"meta": {"steps": float("inf")}}, r"meta.steps = inf: must be a finite number"),
        (
            {"init_kwargs": {"hidden": [8], "init_scale": float("nan")}},
            r"init_kwargs.init_scale = nan: must be a finite number",
        ),
        (
            {"init_kwargs": {"hidden": [8], "init_scale": -1.0}},
            r"init_kwargs.init_scale = -1.0: must be a number > 0",
        ),
        (
            {"init_kwargs": {"hidden": [8], "bias": 3}},
            r"init_kwargs.bias = 3: must be true or false",
        ),
        (
            {"init_kwargs": {"hidden": [8], "fit_steps": True}},
            r"init_kwargs.fit_steps = True: must be an integer >= 1",
        ),
    ],
)
def test_values_are_plain_finite_and_in_range_before_any_build(
    tmp_path, monkeypatch, change, match
):
    f = rewrite(save_learned_loss(ML3Loss(hidden=(8,)), tmp_path / "ml3.pt"), **change)
    monkeypatch.setattr(ML3Loss, "from_saved", classmethod(lambda *a: pytest.fail("built")))
    monkeypatch.setattr(lio, "_meta_build", lambda *a: pytest.fail("built on meta"))
    with pytest.raises(CorruptLossFile, match=rf"ml3.pt: .*{match}"):
        load_learned_loss(f)


def test_save_refuses_what_load_would_refuse(tmp_path):
    with pytest.raises(ValueError, match=r"unknown meta keys \['note'\]"):
        save_learned_loss(PolyN(degree=2), tmp_path / "p.pt", note="x")
    with pytest.raises(ValueError, match=r"meta.setup._target_: Hydra key"):
        save_learned_loss(PolyN(degree=2), tmp_path / "p.pt", setup={"_target_": "os.system"})
    assert not (tmp_path / "p.pt").exists()


def test_every_recorded_learned_loss_still_loads():
    root = Path(__file__).resolve().parents[1] / "experiments"
    # a record's runs (meta_seed_<m>/) and its earlier records (history/) alike
    files = sorted(root.rglob("learned_loss.pt"))
    assert any("meta_seed_" in str(f) for f in files) and any("history" in f.parts for f in files)
    for f in files:
        assert isinstance(load_learned_loss(f), ParametricLoss), f
