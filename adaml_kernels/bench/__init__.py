"""adaml-bench: AdamL's backends against torch.optim.Adam (fused and foreach), side by side.

    adaml-bench [--device cpu|cuda] [--quick] [--sizes 1M,4M,16M] [--dtype float32,bfloat16]
                [--lists gpt2,many_small] [--modes all|default|sr,master,...] [--json PATH]
                [--plot PATH] [--memory-check] [--host-overhead [COUNTS]] [--fsdp [RANKS]]
    python -m adaml_kernels.bench ...

Every available AdamL backend (the reference included) and torch.optim.Adam with fused=True and
with foreach=True step the same parameter tensors, case by case: a sweep of single-tensor sizes
and two realistic parameter lists (GPT-2 small: 148 tensors, 124M parameters; many small tensors:
5,000 tensors). For each case and optimizer it reports the time of the full ``opt.step`` call
(host overhead included), the bytes it moves under the traffic model below, the achieved GB/s,
that as a percentage of a device copy measured in the same run on buffers of the same traffic,
and its time relative to torch's fused Adam.

Each fused AdamL backend also runs in AdamL's low-precision modes (modes.py: sr, master, bf16m,
bf16m+sr, master+bf16m+sr), each for the parameter dtypes it concerns, as rows named e.g.
"cpu+master"; --modes default leaves them out.

Traffic model (bytes per parameter and step; every array is read once and written once):
    AdamL          read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq.
                   Moments are float32 whatever the parameter dtype (float64 for float64), so
                   3 * param_bytes + 4 * 4:  float32 28 B, bfloat16/float16 22 B.
                   With master weights the float32 copy is read instead of the parameter and
                   written besides it (+8 B - 2 B); bf16 moments take 2 B each instead of 4:
                   bf16 params: master 28 B, bf16m 14 B, master+bf16m 20 B; float32: bf16m 20 B.
    torch Adam     the same arrays, with moments in the parameter dtype: 7 * param_bytes:
                   float32 28 B, bfloat16/float16 14 B.
The copy baseline, dst.copy_(src) on float32 buffers whose copy moves the bytes of an AdamL step
(read + write), is timed like the optimizers, interleaved with them. On a CPU a copy also reads
every destination line before writing it (read-for-ownership), which its byte count leaves out,
while an optimizer writes lines it has just read: there, an optimizer can exceed 100% of copy.

Timing: for each case, several independent sets of parameters and gradients are allocated (as
many as needed for the data stepped between two visits of a set to exceed twice the last-level
cache, within a memory budget) and every optimizer cycles through them, so the caches never hold
the previous step's data. After warm-up steps (which also build state and tables) each step is
timed on its own: CUDA events around a step that starts on an idle stream, or time.perf_counter
around the (synchronous) step on the CPU. The optimizers of a case are interleaved cycle by cycle
when their state fits in memory together, so drift of the machine hits them alike: in its turn,
each takes a few untimed steps (a cycle over the sets, or one step), since the first steps after
another optimizer's run slower (dirty cache lines to write back, and more), then a timed block
of at least 4 steps.

The host-overhead case (host_overhead.py) steps many one-element tensors whose gradients are new
at every step, one thread, and reports microseconds per step and per tensor. The FSDP2 case
(fsdp.py) starts its own ranks and times opt.step on a model sharded with fully_shard.

`run_benchmark`, `run_memory_check`, `run_host_overhead` and `run_fsdp` are the programmatic
entry points; `main` (cli.py) is the CLI. Modules: cases (workloads), contenders (what is
compared, traffic model), modes (AdamL's low-precision modes), timing (timer, policy, rotation
sets), environment (machine facts), params (parameter sets), rows (the row each measurement
fills), run (running the cases), host_overhead, fsdp, memory (peak-memory check), goals, report
(header, tables, plot, JSON), errors, cli.
"""

from .cli import main
from .fsdp import run_fsdp
from .host_overhead import run_host_overhead
from .memory import run_memory_check
from .run import BenchConfig, run_benchmark

__all__ = ["BenchConfig", "main", "run_benchmark", "run_fsdp", "run_host_overhead",
           "run_memory_check"]
