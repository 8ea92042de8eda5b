"""FLAME (SIGIR 2026) reproduction: frozen + learnable SASRec with a modular ensemble. See README.md."""
