"""Builds convsim/assets/tiny-tokenizer.json: the real (trained) byte-level BPE tokenizer that the
random-initialised `tiny-*` test models use, so tests need no download.

Run: python tools/make_tiny_tokenizer.py   (deterministic: same corpus, same vocabulary)
"""

import json
from pathlib import Path

import chitchat_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB = 4096
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def corpus(limit=60_000):
    data = json.load(open(chitchat_dataset._PATH))
    n = 0
    for key in sorted(data):
        for burst in data[key]["messages"]:
            for m in burst:
                yield m["text"]
                n += 1
                if n >= limit:
                    return


def main():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    out = Path(__file__).resolve().parents[1] / "convsim" / "assets" / "tiny-tokenizer.json"
    tok.save(str(out))
    print(out, out.stat().st_size)


if __name__ == "__main__":
    main()
