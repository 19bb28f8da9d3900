"""GPT-2 small (124M) on OpenWebText, the recipe of the GPT-2 reproductions (zoo.train.recipes
"gpt2-small"): AdamW β = (0.9, 0.95), lr 6e-4 with 2,000 warm-up steps then cosine to 10% at the
end of the run, weight decay 0.1, clipping 1.0, batch 480 × 1024 tokens, bf16 compute.

    # OpenWebText is not in tfds: export it as DIR/train/*.txt and DIR/validation/*.txt, tokenize it
    # once into a token store (it prints the store's folder), then train on the store from every host
    python experiments/prepare_text.py --text-dir /data/openwebtext --vocab-size 50257 --workers 16 \
        --store-dir gs://BUCKET/stores
    python experiments/gpt2_small_openwebtext.py --store gs://BUCKET/stores/openwebtext-... --mesh fsdp=-1
    # a CPU smoke run on the shipped Shakespeare:
    python experiments/gpt2_small_openwebtext.py --steps 3 --batch 2 --set num_layers=2 --set context_length=64

The model's vocabulary follows the sentencepiece tokenizer trained on the data (--vocab-size).
"""

import zoo
from zoo import experiment


def main() -> None:
    cfg = zoo.configs.gpt("gpt2-small", dtype="bfloat16")
    parser = experiment.parser(
        __doc__, workdir="runs/gpt2-small-openwebtext", steps=600_000, batch=480, checkpoint_every=1000
    )
    experiment.add_text_flags(parser, vocab_size=50257)
    experiment.run_language_model(parser.parse_args(), cfg, "gpt2-small")


if __name__ == "__main__":
    main()
