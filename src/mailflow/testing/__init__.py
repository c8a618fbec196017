"""Testing room: fault-injecting peers (a misbehaving SMTP server) shared by `mailflow demo` and the tests."""
