//! Core errors as Python exceptions: the hierarchy of `esft_rs.errors`, where
//! every class is an `EsftError` and also the builtin a user would catch
//! (`ValueError`, `OSError` and its per-errno subclasses).

use std::io::ErrorKind;

use esft_core::error::Error;
use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;

/// Raises `esft_rs.errors.<class>(*args)`.
pub fn esft_err<'py, A: pyo3::call::PyCallArgs<'py>>(py: Python<'py>, class: &str, args: A) -> PyErr {
    let made = py
        .import("esft_rs.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1(args));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

/// An `EsftValueError` (a bad value or argument, not about a file).
pub fn value_error(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    esft_err(py, "EsftValueError", (msg.into(),))
}

pub fn to_py(err: Error) -> PyErr {
    Python::attach(|py| match err {
        Error::Io { path, source } => {
            let class = match source.kind() {
                ErrorKind::NotFound => "EsftFileNotFoundError",
                ErrorKind::AlreadyExists => "EsftFileExistsError",
                ErrorKind::PermissionDenied => "EsftPermissionError",
                ErrorKind::IsADirectory => "EsftIsADirectoryError",
                ErrorKind::NotADirectory => "EsftNotADirectoryError",
                _ => "EsftIOError",
            };
            let path = path.display().to_string();
            esft_err(py, class, (source.raw_os_error(), source.to_string(), path))
        }
        Error::Format { ref path, .. } | Error::Invalid { ref path, .. } => {
            let path = path.display().to_string();
            esft_err(py, "InvalidFileError", (err.to_string(), path))
        }
        Error::Mismatch(msg) => esft_err(py, "MismatchError", (msg,)),
        Error::Value(msg) | Error::Usage(msg) => value_error(py, msg),
        Error::Cancelled => PyKeyboardInterrupt::new_err("cancelled"),
    })
}
