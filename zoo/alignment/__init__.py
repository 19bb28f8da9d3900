"""Aligning a pretrained GPT with preferences, as InstructGPT did: the chat format and supervised
fine-tuning (`chat`), a reward model from ranked comparisons (`reward`), and PPO against it with a
KL penalty to the SFT policy and the pretraining mix (`ppo`)."""

from zoo.alignment import chat, ppo, reward

__all__ = ["chat", "ppo", "reward"]
