from nrexp.cli import entry

entry()
