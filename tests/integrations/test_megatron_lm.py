"""The Megatron-LM door: --moe-dense-router-grad* flags, args -> config, model build.

The first tests need only megatron-core. The last ones drive a real Megatron-LM checkout
(``MEGATRON_LM_PATH``), whose ``megatron.training`` is not in the megatron-core wheel.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

import pytest
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig
from packaging.version import Version

from megatron_densemixer import DenseMixerMoELayer, DenseMixerTransformerConfig
from megatron_densemixer.integrations import megatron_lm
from megatron_densemixer.options import OPTION_NAMES
from tests.support.builders import MOE_FIELDS

pytestmark = pytest.mark.usefixtures("model_parallel")

# A module-level layer spec for Megatron-LM's ``--spec <module> <name>``.
LOCAL_MOE_LAYER_SPEC = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)

# Each flag, and the ``--moe-densemixer*`` spelling it replaced (still accepted).
FLAGS_AND_OLD_SPELLINGS = [
    ("--moe-dense-router-grad", "--moe-densemixer"),
    ("--moe-dense-router-grad-variant=gated", "--moe-densemixer-variant=gated"),
    ("--moe-dense-router-grad-chunk-size=128", "--moe-densemixer-chunk-size=128"),
    ("--moe-dense-router-grad-chunk-budget-mb=64", "--moe-densemixer-chunk-budget-mb=64"),
    ("--moe-dense-router-grad-topm=3", "--moe-densemixer-topm=3"),
    ("--moe-dense-router-grad-token-fraction=0.5", "--moe-densemixer-token-fraction=0.5"),
]


def parse(argv: list[str]) -> argparse.Namespace:
    return megatron_lm.extra_args_provider(argparse.ArgumentParser()).parse_args(argv)


def test_checkout_with_another_megatron_core_is_refused(tmp_path):
    """MEGATRON_LM_PATH appends the checkout, so pip's megatron.core wins over the checkout's
    own copy: a checkout whose megatron/core version differs must stop with both versions."""
    info = tmp_path / "megatron" / "core" / "package_info.py"
    info.parent.mkdir(parents=True)
    info.write_text('__version__ = "0.99.0"\n')
    with pytest.raises(ImportError, match="carries megatron-core 0.99.0, but the imported"):
        megatron_lm.check_megatron_lm_checkout(str(tmp_path))
    from megatron.core import package_info

    info.write_text(f"__version__ = {package_info.__version__!r}\n")
    megatron_lm.check_megatron_lm_checkout(str(tmp_path))
    # The checkout of the tag a wheel was built from: same release, another git hash.
    release = Version(package_info.__version__).public
    info.write_text(f"__version__ = '{release}+0123abc'\n")
    megatron_lm.check_megatron_lm_checkout(str(tmp_path))


def test_launcher_help_without_megatron_lm():
    """--help without a Megatron-LM checkout prints the DenseMixer flags and one line on what
    is missing: no traceback, no import warnings."""
    launcher = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
    env = {k: v for k, v in os.environ.items() if k not in ("MEGATRON_LM_PATH", "PYTHONPATH")}
    result = subprocess.run(
        [sys.executable, os.path.join(launcher, "pretrain_gpt_densemixer.py"), "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for flag, old in FLAGS_AND_OLD_SPELLINGS:
        assert flag.split("=")[0] in output and old.split("=")[0] in output
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("Megatron-LM not found: set MEGATRON_LM")
    assert "Traceback" not in output and "Warning" not in output


def test_flags_default_to_the_config_defaults():
    """Guards against flag defaults drifting from DenseMixerTransformerConfig's."""
    args = parse([])
    options = megatron_lm.densemixer_options_from_args(args)
    fields = dataclasses.fields(DenseMixerTransformerConfig)
    assert options == {f.name: f.default for f in fields if f.name in OPTION_NAMES}
    assert options["moe_dense_router_grad"] is False


def test_flags_parse_into_config_field_names():
    """Each --moe-dense-router-grad* flag, and its old --moe-densemixer* alias, lands in the
    dest named after its config field."""
    expected = {
        "moe_dense_router_grad": True,
        "moe_dense_router_grad_variant": "gated",
        "moe_dense_router_grad_chunk_size": 128,
        "moe_dense_router_grad_chunk_budget_mb": 64.0,
        "moe_dense_router_grad_topm": 3,
        "moe_dense_router_grad_token_fraction": 0.5,
    }
    # Options without a flag here keep their defaults.
    expected = {**megatron_lm.densemixer_options_from_args(parse([])), **expected}
    flags = [flag for flag, _ in FLAGS_AND_OLD_SPELLINGS]
    assert megatron_lm.densemixer_options_from_args(parse(flags)) == expected
    old_spellings = [old for _, old in FLAGS_AND_OLD_SPELLINGS]
    assert megatron_lm.densemixer_options_from_args(parse(old_spellings)) == expected
    with pytest.raises(SystemExit):
        parse(["--moe-dense-router-grad-variant=dense"])


def test_chained_providers_keep_both():
    """pretrain_gpt.py passes ModelOpt's provider; chaining must keep its flags too."""
    other = lambda parser: parser.add_argument("--other", type=int) and parser  # noqa: E731
    parser = megatron_lm.chain_extra_args_providers(other, None, megatron_lm.extra_args_provider)
    args = parser(argparse.ArgumentParser()).parse_args(["--other", "3", "--moe-dense-router-grad"])
    assert args.other == 3 and args.moe_dense_router_grad is True


def test_args_to_config():
    """A Megatron-built TransformerConfig becomes a DenseMixer one with the flags' values."""
    base = TransformerConfig(**MOE_FIELDS)
    args = parse(["--moe-dense-router-grad", "--moe-dense-router-grad-topm=3"])
    config = megatron_lm.config_from_args(args, base)
    assert type(config) is DenseMixerTransformerConfig
    assert config.moe_dense_router_grad and config.moe_dense_router_grad_topm == 3
    assert config.num_moe_experts == 4 and config.hidden_size == 16
    assert type(base) is TransformerConfig, "input untouched"


def test_args_to_config_validates():
    """The DenseMixer validation runs on the converted config and names the flag."""
    args = parse(["--moe-dense-router-grad", "--moe-dense-router-grad-topm=9"])
    with pytest.raises(ValueError, match="moe_dense_router_grad_topm=9 must satisfy"):
        megatron_lm.config_from_args(args, TransformerConfig(**MOE_FIELDS))


# --------------------------------------------------------------------------------------
# Against a real Megatron-LM checkout
# --------------------------------------------------------------------------------------
MEGATRON_LM_PATH = os.environ.get(megatron_lm.MEGATRON_LM_PATH_ENV)
needs_megatron_lm = pytest.mark.skipif(
    not MEGATRON_LM_PATH,
    reason="MEGATRON_LM_PATH is not set: these tests drive a Megatron-LM checkout's "
    "megatron.training and gpt_builders (not in the megatron-core wheel)",
)

MEGATRON_ARGV = [
    "pretrain_gpt.py",
    "--num-layers=2",
    "--hidden-size=16",
    "--num-attention-heads=4",
    "--ffn-hidden-size=32",
    "--seq-length=8",
    "--max-position-embeddings=8",
    "--micro-batch-size=1",
    "--num-experts=4",
    "--moe-router-topk=2",
    "--moe-token-dispatcher-type=allgather",
    "--transformer-impl=local",
    "--use-cpu-initialization",
    "--swiglu",
    "--disable-bias-linear",
    "--normalization=RMSNorm",
    "--position-embedding-type=rope",
    "--vocab-size=64",
    "--tokenizer-type=NullTokenizer",
    # CPU: the fused kernels need Transformer Engine / apex.
    "--no-rope-fusion",
    "--no-bias-swiglu-fusion",
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
    "--no-persist-layer-norm",
]


@pytest.fixture(scope="module")
def megatron_training():
    """Megatron-LM's argument and builder modules, from MEGATRON_LM_PATH."""
    megatron_lm.add_megatron_lm_to_path(MEGATRON_LM_PATH)
    try:
        arguments = megatron_lm._import_megatron_lm("megatron.training.arguments")
        gpt_builders = megatron_lm._import_megatron_lm("gpt_builders")
    except ImportError as error:
        pytest.fail(f"MEGATRON_LM_PATH={MEGATRON_LM_PATH} is set but not importable: {error}")
    return arguments, gpt_builders


def megatron_args(arguments, monkeypatch, *extra: str) -> argparse.Namespace:
    """Arguments parsed by Megatron-LM's own parser with our extra_args_provider."""
    monkeypatch.setattr(sys, "argv", MEGATRON_ARGV + list(extra))
    args = arguments.parse_args(extra_args_provider=megatron_lm.extra_args_provider)
    arguments.validate_args(args, {})
    # Set by Megatron-LM's tokenizer setup in a real run.
    args.padded_vocab_size = 64
    return args


@needs_megatron_lm
def test_launcher_help_with_megatron_lm():
    """--help with a Megatron-LM checkout lists Megatron-LM's flags and the DenseMixer ones.

    Guards the regression where Megatron-LM's in-process-restart wrapper parsed the command
    line (and printed its help) before the launcher's extra_args_provider was added.
    """
    launcher = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
    result = subprocess.run(
        [sys.executable, os.path.join(launcher, "pretrain_gpt_densemixer.py"), "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, MEGATRON_LM_PATH=MEGATRON_LM_PATH),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--num-experts" in result.stdout and "--moe-router-topk" in result.stdout
    assert "DenseMixer (megatron-densemixer)" in result.stdout
    for flag, old in FLAGS_AND_OLD_SPELLINGS:
        assert flag.split("=")[0] in result.stdout and old.split("=")[0] in result.stdout
    assert "Megatron-LM not found" not in result.stdout


@needs_megatron_lm
def test_megatron_lm_parser_takes_the_flags(megatron_training, monkeypatch):
    """Our flags coexist with Megatron-LM's full parser (no clash, no abbreviation)."""
    arguments, _ = megatron_training
    args = megatron_args(
        arguments, monkeypatch, "--moe-dense-router-grad", "--moe-dense-router-grad-topm=3"
    )
    assert args.moe_dense_router_grad is True and args.moe_dense_router_grad_topm == 3
    assert args.num_experts == 4


@needs_megatron_lm
def test_megatron_lm_config_from_args(megatron_training, monkeypatch):
    """core_transformer_config_from_args' config, converted, carries the flags and the MoE."""
    arguments, _ = megatron_training
    args = megatron_args(arguments, monkeypatch, "--moe-dense-router-grad")
    config = megatron_lm.config_from_args(args)
    assert type(config) is DenseMixerTransformerConfig and config.moe_dense_router_grad
    assert config.num_moe_experts == 4 and config.gated_linear_unit
    assert config.activation_func is F.silu


@needs_megatron_lm
@pytest.mark.parametrize("use_spec", [False, True], ids=["default_spec", "spec_flag"])
def test_megatron_lm_builds_densemixer_layers(megatron_training, monkeypatch, use_spec):
    """Megatron-LM's gpt_builder, driven by densemixer_gpt_builder, yields DenseMixer layers."""
    arguments, gpt_builders = megatron_training
    extra = ["--moe-dense-router-grad"]
    if use_spec:
        extra += ["--spec", __name__, "LOCAL_MOE_LAYER_SPEC"]
    args = megatron_args(arguments, monkeypatch, *extra)
    model = megatron_lm.densemixer_gpt_builder(args, pre_process=True, post_process=True)
    first_mlp = model.decoder.layers[0].mlp
    assert type(first_mlp) is DenseMixerMoELayer
    assert first_mlp.config.moe_dense_router_grad is True
    assert (
        gpt_builders.GPTModel
        is megatron_lm._import_megatron_lm("megatron.core.models.gpt").GPTModel
    ), "the builder patch is undone"
    # Parameter names stay Megatron's, so checkpoints and HF conversion keep working.
    names = {name for name, _ in model.named_parameters()}
    assert "decoder.layers.0.mlp.router.weight" in names
