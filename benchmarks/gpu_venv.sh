# Sourced by benchmarks/run_gpu_multi.sh and benchmarks/run_gpu_node_multicam.sh (not run on its own).
#
# gpu_venv: the GPU machine's python3 ($BASEPY) holds torch but no ROS and no diffusers; the wheels carried in $WHL
# (the ROS Jazzy cp312 wheels, diffusers, ...) go into a fresh /tmp/venv, which sees python3's own packages through
# a .pth (site.addsitedir): a `venv --system-site-packages` made from python3 (itself a venv) would see the base
# interpreter's, not torch. Sets PY to the interpreter to use; returns 1 when pip fails.
gpu_venv() {
  local pyv base
  pyv=$($BASEPY -c 'import sys;print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
  base=$($BASEPY -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
  rm -rf /tmp/venv
  if $BASEPY -m venv --without-pip /tmp/venv; then
    echo "import site; site.addsitedir('$base')" > /tmp/venv/lib/$pyv/site-packages/zz_base.pth
    $BASEPY -m pip install -q --no-index --no-deps --no-compile --ignore-installed --prefix /tmp/venv $WHL/*.whl || return 1
    PY=/tmp/venv/bin/python
  else  # no venv module: into python3's own (venv) prefix, where the bootstrapper's .pth also finds the libs
    $BASEPY -m pip install -q --no-index --no-deps --no-compile $WHL/*.whl || return 1
    PY=$BASEPY
  fi
}
