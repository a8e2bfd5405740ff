"""sd_jax's tests (see tests/conftest.py for the setup every test process shares)."""

# XLA:CPU's LLVM optimisation level for the tests and the scripts they run. The tiny models' programs run for
# milliseconds and compile for seconds: level 0 compiles them faster (tests/test_pipeline.py 294 -> 233 s) and
# computes the same values (LLVM reorders no float arithmetic at any level: the parity and bit-identity tests hold).
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0"
