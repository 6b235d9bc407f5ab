"""Signed webhooks (Standard Webhooks): the events written with the changes they report
(`events`), their signatures (`signing`), the addresses they may go to (`urls`) and their
delivery by the control worker, with retries (`delivery`)."""
