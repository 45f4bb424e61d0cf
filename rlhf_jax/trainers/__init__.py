"""Training loops: supervised (SFT, reward model) in `supervised`, `sft`, `reward`; RL in `ppo`."""
