"""Long audio through wav2vec2 in overlapping chunks: error against the one-pass encode, time, memory, Stop latency.

Random-weight encoders (no weights are downloaded): the tiny 12-layer encoder of the tests (hidden 64, real
320-sample CNN stride) and the full chinese-wav2vec2-base shapes (hidden 768, 12 heads). Random attention spreads
over the whole window, so a chunk's output differs from the one-pass one wherever the window's content differs from
the whole clip's: a pessimistic case for chunking (trained heads attend more locally). Audio: 20 s speech-like clips
(tests/tiny_models.synth_speech) at random levels, repeated to length.

    python bench/long_audio.py                 # errors (tiny: 2 and 20 min, 3 seeds; base: 2 min), 10 and 60 min
    python bench/long_audio.py --quick         # no base-size encoder, no 60 min
"""
import argparse
import os
import sys
import threading
import time

import torch

from _common import import_core, write_result

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def speech(seconds: int, seed: int) -> torch.Tensor:
    from tiny_models import synth_speech
    g = torch.Generator().manual_seed(seed)
    clips = [synth_speech(20, seed=seed * 3 + k) for k in range(3)]
    return torch.cat([clips[i % 3] * (0.3 + torch.rand(1, generator=g)) for i in range(-(-seconds // 20))])[
        :seconds * 16000]


def encoder(kind: str, seed: int):
    from tiny_models import random_state_dict, tiny_wav2vec2
    from wantalk.multitalk.wav2vec2 import CHINESE_WAV2VEC2_BASE, Wav2Vec2Encoder
    g = torch.Generator().manual_seed(seed)
    if kind == "tiny":
        return tiny_wav2vec2(g)[0]
    model = Wav2Vec2Encoder(CHINESE_WAV2VEC2_BASE, device="cpu", dtype=torch.float32)
    sd = random_state_dict(model, g)
    model.load_state_dict({k: (v.abs() + 0.5 if k.endswith("weight_g") else v) for k, v in sd.items()})
    return model.eval().requires_grad_(False)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_rss(fn):
    """(result, seconds, peak RSS growth in bytes) of fn(), RSS sampled every 2 ms."""
    base, peak, stop = rss(), [0], threading.Event()

    def sample():
        while not stop.wait(0.002):
            peak[0] = max(peak[0], rss())
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    return out, seconds, max(peak[0], rss()) - base


def error_case(kind: str, seconds: int, seed: int, reference: str = "one pass") -> dict:
    """Chunked (default `Chunking`) against the one-pass encode, or, for clips too long for the one-pass
    attention on this machine, against the exact layer-by-layer encode (itself checked against the one pass)."""
    from wantalk.multitalk.wav2vec2 import Chunking, encode_for_infinitetalk
    model, wav = encoder(kind, seed), speech(seconds, seed)
    whole = Chunking(one_pass=10**9, exact=10**9) if reference == "one pass" else Chunking(exact=10**9)
    ref, one_s, one_mem = peak_rss(lambda: encode_for_infinitetalk(model, wav, chunking=whole))
    got, chunk_s, chunk_mem = peak_rss(lambda: encode_for_infinitetalk(model, wav))
    layer = ((got - ref).norm(dim=(0, 2)) / ref.norm(dim=(0, 2)))
    frame = ((got - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2)))
    return {"bench": "long_audio", "case": "error", "encoder": kind, "seconds_of_audio": seconds, "seed": seed,
            "reference": reference, "path": "exact" if seconds * 25 <= Chunking().exact else "windows",
            "worst_layer_rel": layer.max().item(), "worst_frame_rel": frame.max().item(),
            "median_frame_rel": frame.median().item(), "reference_s": one_s, "chunked_s": chunk_s,
            "reference_rss_mib": one_mem / 2**20, "chunked_rss_mib": chunk_mem / 2**20}


def long_case(kind: str, seconds: int) -> dict:
    """Time and memory of a long clip, then the Stop latency: a flag set 1 s in, checked by the progress
    callback (as ComfyUI's check_interrupt is), must end the encode within one chunk."""
    from wantalk.multitalk.wav2vec2 import encode_for_infinitetalk
    model, wav = encoder(kind, 0), speech(seconds, 0)
    calls = []
    out, total_s, mem = peak_rss(lambda: encode_for_infinitetalk(
        model, wav, progress=lambda done, total: calls.append(time.perf_counter())))
    chunk_s = max(b - a for a, b in zip(calls, calls[1:]))
    output = out.numel() * out.element_size()
    del out
    stop, seen = [], []

    class Stop(Exception):
        pass

    def progress(done, total):
        seen.append(time.perf_counter())
        if stop:
            raise Stop
    timer = threading.Timer(1.0, lambda: stop.append(time.perf_counter()))
    timer.start()
    try:
        encode_for_infinitetalk(model, wav, progress=progress)
    except Stop:
        pass
    latency = time.perf_counter() - stop[0]
    return {"bench": "long_audio", "case": "long", "encoder": kind, "seconds_of_audio": seconds,
            "encode_s": total_s, "chunks": len(calls), "longest_chunk_s": chunk_s, "output_mib": output / 2**20,
            "rss_growth_mib": mem / 2**20, "beyond_output_mib": (mem - output) / 2**20, "stop_latency_s": latency}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    import_core()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    info = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    rows = []
    cases = [("tiny", 120, seed, "one pass") for seed in range(3)] + [("tiny", 1200, seed, "exact")
                                                                      for seed in range(3)]
    if not args.quick:
        cases += [("base", 120, 0, "one pass")]
    for kind, seconds, seed, reference in cases:
        rows.append(error_case(kind, seconds, seed, reference))
        write_result("long_audio", {**rows[-1], **info})
    for seconds in ((600,) if args.quick else (600, 3600)):
        rows.append(long_case("tiny", seconds))
        write_result("long_audio", {**rows[-1], **info})
    print(f"\n{info}\n| encoder | audio | seed | path | against | worst layer rel. error | worst frame | "
          f"median frame | reference s | chunked s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["case"] == "error":
            print(f"| {r['encoder']} | {r['seconds_of_audio']} s | {r['seed']} | {r['path']} | {r['reference']} | "
                  f"{r['worst_layer_rel']:.2e} | {r['worst_frame_rel']:.2e} | {r['median_frame_rel']:.2e} | "
                  f"{r['reference_s']:.1f} | {r['chunked_s']:.1f} |")
    for r in rows:
        if r["case"] == "long":
            print(f"{r['encoder']} {r['seconds_of_audio']} s: {r['encode_s']:.1f} s in {r['chunks']} chunks "
                  f"(longest {r['longest_chunk_s']:.2f} s), RSS +{r['rss_growth_mib']:.0f} MiB of which output "
                  f"{r['output_mib']:.0f} MiB, Stop after {r['stop_latency_s']:.2f} s")


if __name__ == "__main__":
    main()
