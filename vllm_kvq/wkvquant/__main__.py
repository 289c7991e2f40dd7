"""python -m vllm_kvq.wkvquant {smooth,weights} ...: the calibration commands."""

import sys

from . import smoothing_fit, weights

COMMANDS = {"smooth": smoothing_fit.main, "weights": weights.main}

if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    sys.exit("usage: python -m vllm_kvq.wkvquant {smooth,weights} ... (--help after either: "
             "smooth fits channel smoothing for a KVQ policy, weights writes a 4-bit checkpoint)")
COMMANDS[sys.argv[1]](sys.argv[2:])
