"""The in-sandbox agent. Everything in this folder runs inside the sandbox on whatever
python3 (>= 3.8) the image has, so it imports nothing but the standard library."""
