"""Plumbing every part shares: a trial directory's records and statuses
(`records`, `step_logs`), the config checks (`config_validation`), atomic
writes, the command-line helpers, SIGTERM handling, host and platform set-up.

It imports nothing from `training`, `studies`, `analysis` or `procedures`.
"""
