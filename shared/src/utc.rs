//! Times as people read them: milliseconds since the Unix epoch written as a UTC date and
//! time, for messages, and the UTC date of a moment, for checks on dates such as a date
//! of birth. No time zone is ever assumed but UTC.

/// `ms` as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let rem = secs.rem_euclid(86_400);
    format!(
        "{} {:02}:{:02}:{:02} UTC",
        date(ms),
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The UTC date of `ms`, as `YYYY-MM-DD`.
pub fn date(ms: i64) -> String {
    let days = ms.div_euclid(1000).div_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Howard Hinnant's days-to-civil algorithm: the proleptic Gregorian date `days` after
/// 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(format(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format(1_795_000_000_000), "2026-11-18 11:06:40 UTC");
        assert_eq!(format(-1), "1969-12-31 23:59:59 UTC");
        // A leap day, and the last millisecond of a day.
        assert_eq!(date(951_782_400_000), "2000-02-29");
        assert_eq!(format(951_868_799_999), "2000-02-29 23:59:59 UTC");
    }
}
