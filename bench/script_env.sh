# Sourced by the bench/*.sh experiment scripts: the CLI they run (SPARSETRAIN, e.g.
# "python -m sparsetrain" from a checkout without the package installed) and the
# installed Python sources they build corpora from (SITE: the interpreter's
# site-packages, hundreds of MB of real code on the GPU image).
ST=${SPARSETRAIN:-sparsetrain}
SITE=${SITE:-$(${PYTHON:-python} -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}
