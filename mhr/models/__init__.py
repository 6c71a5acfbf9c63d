"""Models: one file per backbone (hstu, sasrec, hllm + its item_encoder) and per baseline decoder
(comirec, remi, dualvae); the prior heads (heads) and their assembly with a backbone (multihead)."""
