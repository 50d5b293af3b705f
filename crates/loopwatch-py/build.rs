// Exposes `Py_3_10`, `Py_3_11`, ... cfgs so version-specific layouts are chosen at compile time.
fn main() {
    pyo3_build_config::use_pyo3_cfgs();
}
