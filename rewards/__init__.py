"""The rewards service: grants cashback and welcome bonuses from the payments topic into the
write store, exactly once per (campaign, payment) and (campaign, user), within each campaign's
budget (``rewards/store.py`` says why)."""
