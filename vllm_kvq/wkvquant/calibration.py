"""What both calibration commands read: the model and the calibration windows (the middle of
the packaged essays by default: the perplexity benchmark reads their end, the needle haystack
their start)."""


def add_arguments(parser, windows: int) -> None:
    parser.add_argument("--model", help="model path (default: the packaged SmolLM2-135M)")
    parser.add_argument("--text", help="calibration text file (default: the packaged essays)")
    parser.add_argument("--windows", type=int, default=windows, help="calibration windows")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per calibration window")


def model_path(args) -> str:
    from ..assets import smollm2_path

    return args.model or smollm2_path()


def windows(args, tokenizer) -> list[list[int]]:
    from ..allocate import calibration_windows
    from ..assets import essays_text

    text = open(args.text).read() if args.text else essays_text()
    return calibration_windows(tokenizer, text, args.windows, args.tokens)


def describe(args) -> str:
    return (f"{args.windows} x {args.tokens} tokens from the middle of "
            + (args.text or "the packaged essays"))
