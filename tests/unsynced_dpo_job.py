"""`python -m dpo_teach.distributed` with one thing broken on purpose, for tests/test_distributed.py:
the forward pass bypasses DDP's wrapper (the language model inside it is called directly), so DDP
never averages the processes' gradients and each process steps on its own share of the batch. The
test checks that its comparison with one process catches this."""

from dpo_teach import distributed, dpo


def bypassing_ddp(model, *rest):  # BROKEN ON PURPOSE: DDP sees no forward pass, so no all-reduce
    return dpo.dpo_batch_loss(getattr(model, "module", model).lm, *rest)


distributed.dpo_batch_loss = bypassing_ddp
distributed.main()
