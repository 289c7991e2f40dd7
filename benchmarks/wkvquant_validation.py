"""4-bit weight methods side by side in torch: perplexity of each checkpoint's dequantized
weights (float32 transformers, exact attention) on validation text, the essays' middle just
after the calibration windows (not the evaluation end that perplexity.py and wkvquant.py
read). Chooses between methods and settings (k, the loss, the learning rate) without
touching the evaluation text.

    python benchmarks/wkvquant_validation.py build/w4/rtn-g64 build/w4/crr-k5-mae ...
"""

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from common import write_json
from wkvquant import torch_perplexity as perplexity
from vllm_kvq.allocate import probe_text
from vllm_kvq.assets import essays_text, smollm2_path


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="folders written by "
                        "python -m vllm_kvq.wkvquant weights with --dequantized-out")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--out", default="wkvquant_validation")
    args = parser.parse_args()
    ids = probe_text(AutoTokenizer.from_pretrained(smollm2_path()), essays_text(), 16, 512)
    windows = [ids[i * args.tokens:(i + 1) * args.tokens] for i in range(args.windows)]
    rows = [{"model": "W16", "ppl": perplexity(smollm2_path(), windows)}]
    for path in tqdm(args.checkpoints, desc="checkpoints"):
        record = json.loads((Path(path) / "wkvquant.json").read_text())
        rows.append({"model": Path(path).name, "method": record["method"],
                     "training": (record.get("training") or {}).get("settings"),
                     "calibration_seconds": record["seconds"],
                     "ppl": perplexity(record["dequantized"], windows)})
    for r in rows:
        r["vs_w16_pct"] = 100 * (r["ppl"] / rows[0]["ppl"] - 1)
        print(f"{r['model']:<14} {r['ppl']:8.3f} {r['vs_w16_pct']:+7.2f}%")
    write_json(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
