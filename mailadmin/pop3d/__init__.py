"""The POP3 server's Django side: the authenticator, the ORM maildrop and the session registry."""
