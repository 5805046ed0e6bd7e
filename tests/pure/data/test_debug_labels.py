"""Debug printing in axolotl's `decoded(label, id)` format."""
from pure.data.debug import format_labels, format_text
from pure.data.instruct import build_instruct_strategy
from pure.data.settings import DataSettings


def test_format_labels_prints_decoded_label_id_triples(smollm_tokenizer):
    tok = smollm_tokenizer
    ids = tok("Hello good bye", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = [ids[0]] + [-100] * (len(ids) - 2) + [ids[-1]]
    pieces = [tok.decode([i]) for i in ids]
    expected = " ".join(f"{p}({l}, {i})" for p, l, i in zip(pieces, labels, ids))
    assert format_labels(tok, ids, labels) == expected
    # each piece is decoded on its own, leading space included, as axolotl's check_example_labels does
    assert format_labels(tok, ids, labels).startswith(f"Hello({ids[0]}, {ids[0]})  good(-100, {ids[1]})")
    assert format_labels(tok, ids, labels).endswith(f"<|im_end|>({ids[-1]}, {ids[-1]})")


def test_format_text_decodes_the_whole_example(smollm_tokenizer):
    rows = build_instruct_strategy("input_output", {"path": "d"}, smollm_tokenizer, DataSettings())
    [ex] = rows({"segments": [{"label": False, "text": "<|im_start|>Hi\n"}, {"label": True, "text": "yo"}]}, 0)
    assert format_text(smollm_tokenizer, ex["input_ids"]) == "<|im_start|>Hi\nyo"
    assert "\033[31m" in format_labels(smollm_tokenizer, ex["input_ids"], ex["labels"], color=True)
