"""Retrieval probes for the allocator: chat prompts whose answer must be copied from far back.

Next-token KL on running text barely notices a layer whose cache loses a fact read a thousand
tokens ago: most tokens are predicted from the last few. A probe is a chat exchange around a
document (calibration text) with one planted fact, a question about it, and the true answer
as the assistant's reply; its cost counts only the positions that predict the answer tokens,
so it measures exactly the copying that retrieval needs. Facts, phrasing and names are this
module's own (the retrieval benchmark and any held-out check use others).
"""

import random

SUBJECTS = ["the night ferry to Ostmark", "the east wing of the Hollis museum",
            "the mountain hut at Brannock Pass", "the tram depot on Kessel Road",
            "the seed vault at Carrow Fields", "the signal box at Ember Junction"]
FIRST = ["Mirela", "Tobiah", "Liesl", "Oren", "Katya", "Florian", "Agathe", "Ruslan"]
LAST = ["Hostwick", "Vandermeer", "Ashgrove", "Brundle", "Cairncross", "Delacombe",
        "Fenwright", "Goldsby"]


def _fact(rng: random.Random) -> tuple[str, str, str]:
    """(fact sentence, question, answer)."""
    subject = rng.choice(SUBJECTS)
    if rng.random() < 0.5:
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        return (f"The person in charge of {subject} is {name}.",
                f"Who is in charge of {subject}?", f"{name} is in charge of it.")
    code = rng.randint(1000, 9999)
    return (f"The access code for {subject} is {code}.",
            f"What is the access code for {subject}?", f"The access code is {code}.")


def probe_sequences(tokenizer, text_ids: list[int], count: int, tokens: int,
                    seed: int = 0) -> list[tuple[list[int], list[bool]]]:
    """``count`` probes of about ``tokens`` tokens: (token ids, scored) where scored[p] marks
    the positions whose next token is an answer token. The fact sits at depth 0.1-0.5 of a
    document cut from ``text_ids`` (a different stretch per probe)."""
    rng = random.Random(seed)
    probes = []
    for i in range(count):
        fact, question, answer = _fact(rng)
        marker = "\x00DOC\x00"
        user = (f"Here is a document.\n\n{marker}\n\nAnswer from the document: {question}")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            tokenize=False)
        before, after = text.split(marker)
        head = tokenizer(before, add_special_tokens=False)["input_ids"]
        prompt_tail, _ = after.split(answer)
        tail = tokenizer(prompt_tail, add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        fact_ids = tokenizer(" " + fact + " ", add_special_tokens=False)["input_ids"]
        n_doc = tokens - len(head) - len(tail) - len(reply_ids) - len(fact_ids)
        if n_doc < 16:
            raise ValueError(f"probes of {tokens} tokens leave no room for a document")
        stride = max(1, (len(text_ids) - n_doc) // max(1, count))
        start = min(i * stride, len(text_ids) - n_doc)
        doc = text_ids[start:start + n_doc]
        at = int(rng.uniform(0.1, 0.5) * len(doc))
        ids = head + doc[:at] + fact_ids + doc[at:] + tail + reply_ids
        first = len(ids) - len(reply_ids)  # the position predicting reply token 0 is first-1
        scored = [first - 1 <= p < len(ids) - 1 for p in range(len(ids))]
        probes.append((ids, scored))
    return probes
