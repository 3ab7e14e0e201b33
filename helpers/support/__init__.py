"""Plumbing every stage uses.

    device.py     the one device and precision decision
    env.py        Colab or not, Google Drive, the output root, the repository's address
    loading.py    a failed load turned into a message that names the id and says what to do
    locations.py  what a name stands for: a local path or a Hub repo (and a path in it)
    compat.py     every private library name, each behind one thin wrapper with its reason
    atomic.py     writes that an interruption never leaves half done
    disk.py       free space checked before a big write, and a full disk named as such
    lock.py       one writer per folder: a lock file with a heartbeat, shared by the ranks of one launch
    budget_counts.py    the counted T4 budget (t4_budget.json, written by bench/t4_budget.py): the fractions of
                        the T4's peak assumed, a training step's and an image's TFLOP, minutes and memory
    budget.py           what the full profile costs on a T4, notebook by notebook, and the README's summary
    budget_measured.py  a time measured on a GPU as a fraction of the peak, beside the projection
"""
