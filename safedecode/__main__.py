from safedecode.cli import app

app(prog_name="safedecode")
