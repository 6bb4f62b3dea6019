//! Reading the files an operator names (config, key and secret files, CA bundles) with a size
//! cap: a path pointed by mistake at `/dev/zero`, a log or a disk image gets a clear error
//! instead of filling memory.

use std::io::{self, Read};
use std::path::Path;

/// Cap for the config file (1,000 routes take well under 1 MiB).
pub const CONFIG_FILE_LIMIT: u64 = 16 << 20;
/// Cap for a CA bundle in PEM (the Mozilla bundle is about 220 KiB).
pub const CA_FILE_LIMIT: u64 = 16 << 20;
/// Cap for a key file or a secret file (a 4,096-bit RSA key in PEM is about 3.3 KiB).
pub const SECRET_FILE_LIMIT: u64 = 64 << 10;
/// Most bytes read from `server.hosts_file` (hosts(5) lines).
pub const HOSTS_FILE_LIMIT: u64 = 1 << 20;

/// Reads the whole file at `path`, at most `limit` bytes.
///
/// # Errors
/// The open or read error; [`io::ErrorKind::FileTooLarge`] naming the limit when the file holds
/// more than `limit` bytes (nothing past `limit + 1` bytes is read, so a device that never ends
/// is refused too).
pub fn read_capped(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut out = Vec::new();
    file.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("the file is larger than {}", shown(limit)),
        ));
    }
    Ok(out)
}

/// [`read_capped`] for a file that must be a regular file (after symlinks): a key, secret or
/// CA file. A FIFO would block the open until something writes to it, stalling a start or a
/// reload with no message; a device is never what such a key means.
///
/// # Errors
/// As [`read_capped`]; [`io::ErrorKind::InvalidInput`] naming the kind of file otherwise.
pub fn read_regular_capped(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::metadata(path)?.file_type();
    let other = if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("a device")
    };
    if let Some(other) = other {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it is {other}, not a regular file"),
        ));
    }
    read_capped(path, limit)
}

/// [`read_regular_capped`] for a text file.
///
/// # Errors
/// As [`read_regular_capped`]; [`io::ErrorKind::InvalidData`] if the content is not UTF-8.
pub fn read_regular_to_string_capped(path: &Path, limit: u64) -> io::Result<String> {
    utf8(read_regular_capped(path, limit)?)
}

fn utf8(bytes: Vec<u8>) -> io::Result<String> {
    String::from_utf8(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "the file is not UTF-8 text"))
}

/// [`read_capped`] for a text file.
///
/// # Errors
/// As [`read_capped`]; [`io::ErrorKind::InvalidData`] if the content is not UTF-8.
pub fn read_to_string_capped(path: &Path, limit: u64) -> io::Result<String> {
    utf8(read_capped(path, limit)?)
}

fn shown(limit: u64) -> String {
    if limit >= 1 << 20 {
        format!("{} MiB", limit >> 20)
    } else {
        format!("{} KiB", limit >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_device_is_refused_without_reading_it_all() {
        let e = read_capped(Path::new("/dev/zero"), SECRET_FILE_LIMIT).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        assert_eq!(e.to_string(), "the file is larger than 64 KiB");
    }

    #[test]
    fn keys_and_secrets_must_be_regular_files() {
        for (path, kind) in [("/dev/zero", "a device"), ("/tmp", "a directory")] {
            let e = read_regular_capped(Path::new(path), SECRET_FILE_LIMIT).unwrap_err();
            assert_eq!(e.to_string(), format!("it is {kind}, not a regular file"));
        }
        let fifo = std::env::temp_dir().join(format!("tokengate-fifo-{}", std::process::id()));
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Refused without opening it (an open would wait for a writer forever).
        let e = read_regular_to_string_capped(&fifo, SECRET_FILE_LIMIT).unwrap_err();
        assert_eq!(e.to_string(), "it is a FIFO, not a regular file");
        std::fs::remove_file(&fifo).unwrap();
    }

    #[test]
    fn a_file_at_the_limit_is_read_whole() {
        let path = std::env::temp_dir().join(format!("tokengate-files-{}", std::process::id()));
        std::fs::write(&path, vec![b'a'; 1024]).unwrap();
        assert_eq!(read_capped(&path, 1024).unwrap().len(), 1024);
        assert_eq!(
            read_capped(&path, 1023).unwrap_err().kind(),
            io::ErrorKind::FileTooLarge
        );
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert_eq!(
            read_to_string_capped(&path, 1024).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        std::fs::remove_file(&path).unwrap();
    }
}
