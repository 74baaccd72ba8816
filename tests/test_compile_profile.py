"""tools/compile_profile: libtpu's log lines (in the format libtpu 0.0.42 writes them) to per-pass, per-stage
and per-kernel seconds, and an optimised HLO dump's source stacks to parts of the model."""
from __future__ import annotations

import pytest

from tools import compile_profile

pytestmark = pytest.mark.tpu

LOG = """\
I1207 22:25:15.000000    2787 deepsea_compiler_hlo_passes.cc:6046] XLA::TPU running hlo passes for 45,587 instructions, module: jit_train_step
I1207 22:25:16.000000    2787 hlo_pass_pipeline.cc:176] HLO pass: dce time: 4.99 ms (4990 us) (cumulative: 4.99 ms, max: 4.99 ms, #called: 1)
I1207 22:25:17.000000    2787 hlo_pass_pipeline.cc:176] HLO pass: layout-assignment time: 4.4 s (4400000 us) (cumulative: 4.4 s, max: 4.4 s, #called: 2)
I1207 22:25:18.000000    2787 hlo_pass_pipeline.cc:176] HLO pass: dce time: 1.5 s (1500000 us) (cumulative: 5.9 s, max: 4.4 s, #called: 3)
I1207 22:26:09.814365    2787 deepsea_compiler_hlo_passes.cc:6241] HLO_PASSES stage duration: 55.51366842375s
I1207 22:26:10.000000    5959 deepsea_compiler_backend.cc:3769] [fusion.1] LLO optimizing 1,200 instructions
I1207 22:26:10.500000    5960 deepsea_compiler_backend.cc:3769] [all-reduce.3] LLO optimizing 90 instructions
I1207 22:26:12.000000    5959 deepsea_compiler_backend.cc:3769] [fusion.2] LLO optimizing 10 instructions
W1207 22:26:13.000000    5959 lowering_emitter.cc:6105] Successful retry compilation of fusion.2 after retry_count=1
I1207 22:26:20.500000    5960 deepsea_compiler_backend.cc:3422] XLA::TPU LLO dependency graph-based optimizations and scheduling time: 8.75 s (8745940 us)
I1207 22:26:21.000000    5959 deepsea_compiler_backend.cc:3422] XLA::TPU LLO dependency graph-based optimizations and scheduling time: 1 s (1000000 us)
I1207 23:31:33.043293    3432 deepsea_compiler_base.cc:3931] BACKEND_PASSES stage duration: 5m22.633016272s
I1207 22:38:51.868574    3432 deepsea_compiler_backend.cc:1488] CODE_GENERATION stage duration: 943.9985765ms
"""

DUMP = """\
HloModule jit_train_step

FileNames
1 "/site-packages/flax/nnx/nn/linear.py"
2 "/work/main/iconface_jax/models/vae.py"
3 "/work/main/iconface_jax/train.py"

FunctionNames
1 "__call__"

FileLocations
1 {file_name_id=3 function_name_id=1 line=10 end_line=10 column=1 end_column=1}
2 {file_name_id=2 function_name_id=1 line=241 end_line=241 column=1 end_column=1}
3 {file_name_id=1 function_name_id=1 line=889 end_line=889 column=1 end_column=1}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}

ENTRY %main {
  %fusion.1 = f32[8]{0} fusion(%p), kind=kOutput, calls=%c, metadata={op_name="jit(train_step)/conv" stack_frame_id=3}
  %fusion.2 = f32[8]{0} fusion(%p), kind=kLoop, calls=%d, metadata={op_name="jit(train_step)/add" stack_frame_id=1}
}
"""


def test_passes_stages_and_kernels_are_read_from_the_log():
    (module,) = compile_profile.parse(LOG.splitlines())
    assert (module.name, module.instructions) == ("jit_train_step", 45587)
    assert module.passes["dce"] == pytest.approx(1.50499) and module.calls["dce"] == 2
    assert module.passes["layout-assignment"] == pytest.approx(4.4)
    assert module.stages == pytest.approx({"HLO_PASSES": 55.51366842375, "BACKEND_PASSES": 322.633016272,
                                           "CODE_GENERATION": 0.9439985765})  # ms, not minutes
    # a kernel runs to the next kernel on its thread, the last one on a thread to that thread's last line
    assert module.kernels == pytest.approx({"fusion.1": 2.0, "fusion.2": 9.0, "all-reduce.3": 10.0})
    assert module.retried == {"fusion.2": 1}


def test_kernels_are_named_by_the_source_that_made_them():
    """fusion.1's innermost frame is flax's Conv, called from vae.py (its parent, written as index + 1)."""
    parts = compile_profile.kernel_parts(DUMP.splitlines())
    assert parts == {"fusion.1": "VAE", "fusion.2": "train step"}
    (module,) = compile_profile.parse(LOG.splitlines())
    text = compile_profile.report([module], top=5, parts=parts)
    assert "backend thread-s by part: all-reduce 10, train step 9, VAE 2" in text
    assert "fusion.2  [train step]  (compiled 2 times)" in text
