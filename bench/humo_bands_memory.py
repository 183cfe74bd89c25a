"""HuMo Embeds' host memory at Whisper-large-v3 sizes: the bands reduced window by window
(`humo_bands_streamed`) against the all-layers path (33 hidden states of the whole clip, then `humo_bands`).

The windows are random `[1500, 33, 1280]` float16 tensors, the layout and dtype the GPU encoder yields per 30 s
(no weights can be downloaded; the reduction does not depend on them). Peak = growth of this process's peak
resident size (Linux /proc/self/clear_refs) over its size before the call.

    python bench/humo_bands_memory.py            # 2 min both paths (and bit-identity), 10 and 60 min streamed
    python bench/humo_bands_memory.py --quick    # no 60 min
"""
import argparse
import time

import torch

from _common import import_core, write_result

POSITIONS, LAYERS, CHANNELS = 1500, 33, 1280


def peak_growth(fn):
    def resident(key):
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(fields[key].split()[0]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, start = resident("VmRSS"), time.perf_counter()
    result = fn()
    return result, resident("VmHWM") - before, time.perf_counter() - start


def windows(t50: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for first in range(0, t50, POSITIONS):
        yield torch.randn(min(POSITIONS, t50 - first), LAYERS, CHANNELS, generator=g).half()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import_core()
    from wantalk.humo.audio_features import humo_bands, humo_bands_streamed
    gib = 2 ** 30
    rows, streamed = [], {}
    cases = [(2, "streamed"), (2, "all layers"), (10, "streamed")] + ([] if args.quick else [(60, "streamed")])
    for minutes, path in cases:
        t50 = minutes * 60 * 50
        if path == "streamed":
            bands, peak, seconds = peak_growth(lambda: humo_bands_streamed((w.float() for w in windows(t50, 0)), t50))
            streamed[minutes] = bands if minutes == 2 else None    # kept for the all-layers comparison only
        else:
            bands, peak, seconds = peak_growth(lambda: humo_bands(torch.cat([w.float() for w in windows(t50, 0)])))
        same = "" if path == "streamed" else str(torch.equal(bands, streamed[minutes]))
        rows.append({"minutes": minutes, "path": path, "peak_gib": round(peak / gib, 3),
                     "bands_gib": round(bands.nbytes / gib, 3), "seconds": round(seconds, 1), "bit_identical": same})
        print(rows[-1], flush=True)
        del bands
    print(f"torch {torch.__version__}")
    write_result("humo_bands_memory", {"torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
