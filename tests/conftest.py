"""Strict test configuration: explicit ranks everywhere, jaxtyping shape checks at runtime."""

import os

# 8 simulated CPU devices for the sharding tests; LLVM optimisation off, because the suite's time is
# compiling thousands of small programs (a third less), and no result may depend on how XLA
# optimises them (float32 checks are relative to the largest value, float64 ones at 1e-10).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The CLI would turn on its persistent compilation cache for the whole test process; its own test turns it on.
os.environ.setdefault("ACDC_JAX_COMPILE_CACHE", "0")
# One XLA compilation cache for this test run, shared by both xdist workers (they inherit the
# controller's environment), the notebook kernels and the CLI subprocesses: the suite drops compiled
# code after every module (below) and many modules compile the same programs. A fresh directory per
# run, so nothing carries over between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="acdc-jax-tests-xla-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

from jaxtyping import install_import_hook  # noqa: E402

with install_import_hook("acdc_jax", "beartype.beartype"):
    import acdc_jax  # noqa: E402,F401

import pytest  # noqa: E402

from acdc_jax.models import TransformerConfig, init_model  # noqa: E402

# Small configurations that exercise every architectural switch.
TINY_CONFIGS = {
    "gpt2-like": TransformerConfig(n_layers=2, n_heads=3, d_model=12, d_head=4, d_mlp=20, d_vocab=29, n_ctx=9),
    "attn-only": TransformerConfig(
        n_layers=2, n_heads=2, d_model=8, d_head=4, d_mlp=None, d_vocab=17, n_ctx=8, tied_unembed=False, d_vocab_out=11
    ),
    "tracr-like": TransformerConfig(
        n_layers=3, n_heads=2, d_model=10, d_head=3, d_mlp=7, d_vocab=13, n_ctx=6, act_fn="relu",
        normalization=None, causal=False, tied_unembed=False,
    ),
}


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model(request):
    return init_model(TINY_CONFIGS[request.param], jax.random.PRNGKey(0), std=0.3)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compiled executables after each test module.

    Every XLA:CPU executable keeps a few memory mappings of JIT-compiled code, and the whole suite in one
    process compiles enough distinct programs to reach Linux's default ``vm.max_map_count`` (65,530), at
    which point LLVM's next allocation fails and the process dies with a segmentation fault inside
    ``backend_compile_and_load``. No test depends on another module's compiled code, so clearing the caches
    between modules costs only recompilation of the few shared programs.
    """
    yield
    jax.clear_caches()
