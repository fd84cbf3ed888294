"""Helpers of bench/gpu_suite.sh: build what travels to the device, print the table.

    python bench/gpu_suite_carry.py site WHEEL_DIR DEST     # unpack + prune the wheels
    python bench/gpu_suite_carry.py jit WHEEL_DIR BUILD_DIR # FlashInfer's module, sm_90a
    python bench/gpu_suite_carry.py smollm2 CARRY_DIR       # tokenizer + GGUF halves
    python bench/gpu_suite_carry.py table results.jsonl     # the summary table
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import zipfile

# FlashInfer reads its data/csrc/batch_prefill* sources to generate the module's specs
# (the lazily built stride variant's too), even when the .so is already built.
# the args of flashinfer.prefill.get_batch_prefill_module for the Llama shapes in bf16
_FI_MODULE_ARGS = ("bfloat16", "bfloat16", "bfloat16", "int32", 128, 128, 0, False, False, False)


def _keep(name: str, size: int) -> bool:
    """Python code and small files run on the device; headers only matter to nvcc."""
    if name.startswith("flashinfer/data/csrc/"):
        return name.count("/") == 3 and name.rsplit("/", 1)[-1].startswith(
            ("batch_prefill", "sampling", "renorm", "flashinfer_sampling"))
    if name.startswith("flashinfer/data/"):
        return name.endswith(".py")
    if name.startswith("flashinfer/"):
        return name.endswith(".py") or size < 64 * 1024
    if name.startswith(("tvm_ffi/include/", "tvm_ffi/3rdparty/")):
        return False
    return not (name.startswith("flashinfer_python") and name.endswith("/RECORD"))


def site(wheel_dir: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    for whl in sorted(glob.glob(os.path.join(wheel_dir, "*.whl"))):
        with zipfile.ZipFile(whl) as z:
            for info in z.infolist():
                if info.is_dir() or not _keep(info.filename, info.file_size):
                    continue
                path = z.extract(info, dest)
                if info.external_attr >> 16 & 0o111 or path.endswith(".so"):
                    os.chmod(path, 0o755)


def jit(wheel_dir: str, build_dir: str) -> None:
    """Compile the module with this machine's nvcc (CUDA 13.0, like the device) for sm_90a.

    Needs flashinfer importable by this Python: the py3 wheel plus this Python's
    apache-tvm-ffi and nvidia-ml-py, installed under build_dir. libcuda is not linked by
    anything the module uses, so an empty stub satisfies the link line's -lcuda."""
    site_dir = os.path.join(build_dir, "site")
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    if not os.path.isdir(os.path.join(site_dir, "flashinfer")):
        pip = [sys.executable, "-m", "pip"]
        subprocess.run(pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                              build_dir, "apache-tvm-ffi==0.1.15.post2"], check=True)
        wheels = glob.glob(os.path.join(wheel_dir, "flashinfer_python-*.whl")) + \
            glob.glob(os.path.join(build_dir, f"apache_tvm_ffi-*cp{py}*.whl"))
        subprocess.run(pip + ["install", "-q", "--no-deps", "--target", site_dir, *wheels],
                       check=True)
        subprocess.run(pip + ["install", "-q", "--target", site_dir, "nvidia-ml-py", "einops",
                              "tabulate", "ninja"], check=True)
    stub = os.path.join(build_dir, "stub")
    os.makedirs(stub, exist_ok=True)
    if not os.path.exists(os.path.join(stub, "libcuda.so")):
        src = os.path.join(stub, "empty.c")
        open(src, "w").close()
        subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                        os.path.join(stub, "libcuda.so"), src], check=True)
    # the sampling module includes curand.h, which this machine's CUDA lacks: take the
    # headers from NVIDIA's wheel
    curand = os.path.join(build_dir, "curand")
    if not os.path.isdir(os.path.join(curand, "nvidia")):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--platform", "manylinux_2_27_x86_64",
                        "--python-version", "3.12", "-d", build_dir, "nvidia-curand==10.4.0.35"],
                       check=True)
        whl = glob.glob(os.path.join(build_dir, "nvidia_curand-*.whl"))[0]
        with zipfile.ZipFile(whl) as z:
            z.extractall(curand, [n for n in z.namelist() if "/include/" in n])
    code = ("import torch\n"
            "from flashinfer.jit.attention.modules import _gen_batch_prefill_primary_module\n"
            "from flashinfer.jit.sampling import gen_sampling_module\n"
            f"a = {_FI_MODULE_ARGS!r}\n"
            "a = tuple(getattr(torch, x) if isinstance(x, str) else x for x in a)\n"
            "for spec in (_gen_batch_prefill_primary_module('fa2', *a), gen_sampling_module()):\n"
            "    spec.build(verbose=False)\n"
            "    print('built', spec.jit_library_path)\n")
    env = dict(os.environ, PYTHONPATH=site_dir, FLASHINFER_CUDA_ARCH_LIST="9.0a",
               CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"),
               CPATH=os.path.join(curand, "nvidia", "cu13", "include"),
               LIBRARY_PATH=stub, MAX_JOBS=str(os.cpu_count() or 2))
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def smollm2(carry: str) -> None:
    from asgl.models.gguf_loader import convert_gguf  # noqa: F401 - fails early if absent
    from asgl.models.loader import _from_gguf, embedded_model_path
    from asgl.config import EngineConfig

    gguf = embedded_model_path()
    source = _from_gguf(gguf, EngineConfig())
    tok = os.path.join(carry, "tok")
    shutil.rmtree(tok, ignore_errors=True)
    os.makedirs(tok)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json"):
        path = os.path.join(source.tokenizer_dir, name)
        if os.path.exists(path):
            shutil.copy(path, tok)
    with open(gguf, "rb") as f:
        data = f.read()
    half = len(data) // 2
    for part, chunk in (("gguf_a", data[:half]), ("gguf_b", data[half:])):
        os.makedirs(os.path.join(carry, part), exist_ok=True)
        with open(os.path.join(carry, part, "part"), "wb") as f:
            f.write(chunk)


def table(path: str) -> None:
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    print("\n==================== asgl GPU suite ====================")
    if rows:
        print(f"card: {rows[0].get('card')}  date: {rows[0].get('date')}")
    for r in rows:
        if r.get("bench") == "check":
            extra = r.get("verdicts") or [round(c.get("rel_err", 0), 5) for c in r.get("cases", [])]
            print(f"check {r['check']:<28} {'PASS' if r['pass'] else 'FAIL'}  {extra}")
    print(f"{'engine':<22}{'workload':<10}{'detok':<7}{'out tok/s':>11}{'total tok/s':>12}"
          f"{'secs':>8}{'graphs':>8}{'idle':>7}{'loopms':>8}")
    for r in rows:
        if r.get("bench") != "offline":
            continue
        eng = r["engine"] if r["engine"] != "asgl" else f"asgl/{r.get('attention_backend')}"
        loop = r.get("loop_cpu_ms_per_decode_step_bs192_320")
        print(f"{eng[:21]:<22}{r['workload']:<10}{str(r.get('detokenize', '')):<7}"
              f"{r.get('output_tok_s', 0):>11,.0f}{r.get('total_tok_s', 0) or 0:>12,.0f}"
              f"{r.get('elapsed_s', 0):>8.2f}"
              f"{r['graph_share'] if 'graph_share' in r else float('nan'):>8.0%}"
              f"{r['gpu_idle_share'] if 'gpu_idle_share' in r else float('nan'):>7.1%}"
              f"{loop if loop else float('nan'):>8.2f}"
              + (f"  ERROR {r['error'][:60]}" if "error" in r else "")
              + (f"  start-up {r['startup_s']}s" if r.get("workload") == "W1" and "startup_s" in r else "")
              + (f"  [{r['tag']}]" if r.get("tag") else ""))
    for r in rows:
        if r.get("bench") == "json_decode":
            print("json_decode", json.dumps({k: v for k, v in r.items() if k != "bench"}))
        elif "worst_gap_during_prefill_ms" in r:
            print(f"chunked_prefill chunk={r['chunk']} prompt={r['prompt_len']}: idle gap "
                  f"{r['idle_gap_ms']} ms, worst gap during prefill "
                  f"{r['worst_gap_during_prefill_ms']} ms (median "
                  f"{r.get('median_gap_during_prefill_ms')}), prefill {r['prefill_seconds']} s")
    for r in rows:
        if r.get("bench") == "one_batch":
            print(f"one_batch bs={r['batch_size']:<3} in={r['input_len']}: prefill {r['prefill_ms']:.1f} ms "
                  f"({r['prefill_tok_s']:,.0f} tok/s); decode {r['decode_ms_median']:.2f} ms/step "
                  f"({r['decode_tok_s']:,.1f} tok/s) [{r['attention_backend']}, graphs={r['cuda_graph']}]")


def ab_table(path: str) -> None:
    """Median output tok/s per (workload, tag) of the A/B rounds, and after / baseline."""
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    runs: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.get("bench") == "offline" and "error" not in r:
            runs.setdefault((r["workload"], r.get("tag", "")), []).append(r["output_tok_s"])
    print("\n==================== A/B offline (median of rounds) ====================")
    if rows:
        print(f"card: {rows[0].get('card')}  date: {rows[0].get('date')}")
    for wl in sorted({w for w, _ in runs}):
        after, before = runs.get((wl, "after"), []), runs.get((wl, "baseline"), [])
        if after and before:
            ratio = statistics.median(after) / statistics.median(before)
            print(f"{wl:<8} after {statistics.median(after):>9,.0f} {after}  baseline "
                  f"{statistics.median(before):>9,.0f} {before}  ratio {ratio:.3f}")


def main() -> None:
    cmd, *rest = sys.argv[1:]
    {"site": site, "jit": jit, "smollm2": smollm2, "table": table, "ab-table": ab_table}[cmd](*rest)


if __name__ == "__main__":
    main()
