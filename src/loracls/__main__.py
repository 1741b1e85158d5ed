from loracls.cli import main

try:
    code = main()
except KeyboardInterrupt:  # a second interrupt while the first one was being handled
    code = 130
raise SystemExit(code)
