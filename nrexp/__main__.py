from nrexp.cli import entry

if __name__ == "__main__":  # not when a helper process (nrexp/figures.py, spawned) imports the main module
    entry()
