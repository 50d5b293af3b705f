//! Line numbers from a code object's line table, decoded without Python: what a stack read from
//! another thread (the watchdog's) has, since it cannot ask the interpreter while the GIL is held.
//! Three formats: 3.9's `co_lnotab`, 3.10's `co_linetable`, 3.11+'s location table.

/// The format of the table a code object carries, by CPython version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineTable {
    /// 3.9 `co_lnotab`: (bytecode increment, signed line increment) byte pairs.
    Lnotab,
    /// 3.10 `co_linetable` (PEP 626): (bytecode delta, signed line delta or -128) byte pairs.
    Pep626,
    /// 3.11+ location table: variable-length entries, each covering some code units.
    Locations,
}

/// The most entries a table is read for: a bound on work for a table read while it may be
/// changing underneath (the watchdog's reads), far above any real function's.
const MAX_ENTRIES: usize = 1 << 20;

/// Where in the source an instruction comes from: its line, and from 3.11 the span of the
/// expression it runs (a call's is the whole call, `time.sleep(0.05)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: u32,
    /// The span's last line and its columns (UTF-8 byte offsets, the end exclusive), where the
    /// table has them.
    pub span: Option<Span>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub end_line: u32,
    pub col: u32,
    pub end_col: u32,
}

impl LineTable {
    /// The line of the instruction at byte offset `offset` of code whose first line is
    /// `first_line`, or `None` where the table gives none (or is malformed).
    pub fn line_at(self, table: &[u8], first_line: i32, offset: usize) -> Option<u32> {
        self.position_at(table, first_line, offset)
            .map(|position| position.line)
    }

    /// The line of that instruction and, where the table says (3.11+), its span.
    pub fn position_at(self, table: &[u8], first_line: i32, offset: usize) -> Option<Position> {
        let (line, span) = match self {
            LineTable::Lnotab => (lnotab_line(table, first_line, offset), None),
            LineTable::Pep626 => (pep626_line(table, first_line, offset)?, None),
            LineTable::Locations => locations_position(table, first_line, offset)?,
        };
        let line = u32::try_from(line).ok().filter(|&line| line > 0)?;
        Some(Position {
            line,
            span: span.filter(|span| span.end_line >= line),
        })
    }
}

fn lnotab_line(table: &[u8], first_line: i32, offset: usize) -> i32 {
    let mut line = first_line;
    let mut address = 0usize;
    for pair in table.chunks_exact(2) {
        address += usize::from(pair[0]);
        if address > offset {
            break;
        }
        line += i32::from(pair[1] as i8);
    }
    line
}

fn pep626_line(table: &[u8], first_line: i32, offset: usize) -> Option<i32> {
    let mut line = first_line;
    let mut start = 0usize;
    for pair in table.chunks_exact(2) {
        let delta = pair[1] as i8;
        let range_line = if delta == -128 {
            None
        } else {
            line += i32::from(delta);
            Some(line)
        };
        let end = start + usize::from(pair[0]);
        if (start..end).contains(&offset) {
            return range_line;
        }
        start = end;
    }
    None
}

/// A reader of the location table's entries (CPython's `InternalDocs/locations.md`).
struct Entries<'a> {
    table: &'a [u8],
    at: usize,
}

impl Entries<'_> {
    fn byte(&mut self) -> Option<u8> {
        let byte = *self.table.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    /// Six bits a byte, least significant first, bit 6 set on every byte but the last.
    fn varint(&mut self) -> Option<u32> {
        let mut value = 0u32;
        for shift in (0..32).step_by(6) {
            let byte = self.byte()?;
            value |= u32::from(byte & 0x3f) << shift;
            if byte & 0x40 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn svarint(&mut self) -> Option<i32> {
        let value = self.varint()?;
        let magnitude = (value >> 1) as i32;
        Some(if value & 1 == 1 {
            -magnitude
        } else {
            magnitude
        })
    }
}

/// The line of the entry covering `offset`, and its span where the entry has columns.
fn locations_position(table: &[u8], first_line: i32, offset: usize) -> Option<(i32, Option<Span>)> {
    let target = offset / 2; // entries count 2-byte code units
    let mut entries = Entries { table, at: 0 };
    let mut line = first_line;
    let mut unit = 0usize;
    // A span on the entry's own line, from its columns.
    let same_line = |line: i32, col: u32, end_col: u32| {
        u32::try_from(line).ok().map(|end_line| Span {
            end_line,
            col,
            end_col,
        })
    };
    for _ in 0..MAX_ENTRIES {
        let head = entries.byte()?;
        if head & 0x80 == 0 {
            return None; // not the first byte of an entry: the table is not what we think
        }
        let code = (head >> 3) & 0x0f;
        let length = usize::from(head & 0x07) + 1;
        let entry = match code {
            0..=9 => {
                // Short form: the column's high bits are in the code, the length in the byte.
                let byte = entries.byte()?;
                let col = u32::from(code) * 8 + u32::from((byte >> 4) & 7);
                Some((line, same_line(line, col, col + u32::from(byte & 15))))
            }
            10..=12 => {
                line += i32::from(code) - 10;
                let col = u32::from(entries.byte()?);
                let end_col = u32::from(entries.byte()?);
                Some((line, same_line(line, col, end_col)))
            }
            13 => {
                line += entries.svarint()?;
                Some((line, None))
            }
            14 => {
                line += entries.svarint()?;
                let end_line = i64::from(line) + i64::from(entries.varint()?);
                // Columns are stored plus one: 0 means none.
                let col = entries.varint()?.checked_sub(1);
                let end_col = entries.varint()?.checked_sub(1);
                let span = match (u32::try_from(end_line), col, end_col) {
                    (Ok(end_line), Some(col), Some(end_col)) => Some(Span {
                        end_line,
                        col,
                        end_col,
                    }),
                    _ => None,
                };
                Some((line, span))
            }
            _ => None, // 15: no location
        };
        if (unit..unit + length).contains(&target) {
            return entry;
        }
        unit += length;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lnotab_lines_advance_at_each_increment() {
        // Line 10 for bytes 0..6, 11 for 6..10, 13 from 10 on.
        let table = [6, 1, 4, 2];
        let line = |offset| LineTable::Lnotab.line_at(&table, 10, offset);
        assert_eq!(line(0), Some(10));
        assert_eq!(line(5), Some(10));
        assert_eq!(line(6), Some(11));
        assert_eq!(line(10), Some(13));
        assert_eq!(line(40), Some(13));
    }

    #[test]
    fn lnotab_line_decrements_are_signed() {
        let table = [4, 3, 4, 0xfe]; // +3 then -2
        assert_eq!(LineTable::Lnotab.line_at(&table, 20, 8), Some(21));
    }

    #[test]
    fn pep626_ranges_give_their_line_or_none() {
        // bytes 0..4: first+1, 4..8: no line, 8..14: first+1+2
        let table = [4, 1, 4, 0x80, 6, 2];
        let line = |offset| LineTable::Pep626.line_at(&table, 5, offset);
        assert_eq!(line(0), Some(6));
        assert_eq!(line(3), Some(6));
        assert_eq!(line(4), None);
        assert_eq!(line(8), Some(8));
        assert_eq!(line(13), Some(8));
        assert_eq!(line(14), None);
    }

    /// An entry of code `code` covering `units` code units, with its payload.
    fn entry(code: u8, units: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0x80 | (code << 3) | (units - 1)];
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn locations_decode_every_entry_form() {
        let mut table = Vec::new();
        table.extend(entry(13, 1, &[0])); // units 0: line +0 (no columns): 7
        table.extend(entry(11, 2, &[4, 9])); // units 1..3: one-line form, +1: 8
        table.extend(entry(3, 1, &[5])); // unit 3: short form, same line: 8
        table.extend(entry(14, 3, &[4, 0, 1, 5])); // units 4..7: long form, +2: 10
        table.extend(entry(15, 1, &[])); // unit 7: no location
        table.extend(entry(13, 2, &[3])); // units 8..10: svarint 3 = -1: 9
        table.extend(entry(13, 1, &[0x40 | 0x04, 0x01])); // unit 10: varint 68 = +34: 43
        let line = |unit: usize| LineTable::Locations.line_at(&table, 7, unit * 2);
        assert_eq!(line(0), Some(7));
        assert_eq!(line(1), Some(8));
        assert_eq!(line(2), Some(8));
        assert_eq!(line(3), Some(8));
        assert_eq!(line(4), Some(10));
        assert_eq!(line(6), Some(10));
        assert_eq!(line(7), None);
        assert_eq!(line(8), Some(9));
        assert_eq!(line(9), Some(9));
        assert_eq!(line(10), Some(43));
        assert_eq!(line(11), None);
    }

    #[test]
    fn locations_give_the_span_of_each_entry_where_it_has_columns() {
        let mut table = Vec::new();
        table.extend(entry(13, 1, &[0])); // unit 0: line 7, no columns
        table.extend(entry(11, 1, &[4, 9])); // unit 1: line 8, columns 4..9
        table.extend(entry(3, 1, &[0x52])); // unit 2: line 8, column 3*8+5 = 29, length 2
        table.extend(entry(14, 1, &[4, 1, 5, 12])); // unit 3: lines 10..11, columns 4..11
        table.extend(entry(14, 1, &[0, 0, 0, 0])); // unit 4: line 10, columns unknown
        let at = |unit: usize| LineTable::Locations.position_at(&table, 7, unit * 2);
        let span = |end_line, col, end_col| {
            Some(Span {
                end_line,
                col,
                end_col,
            })
        };
        assert_eq!(
            at(0),
            Some(Position {
                line: 7,
                span: None
            })
        );
        assert_eq!(
            at(1),
            Some(Position {
                line: 8,
                span: span(8, 4, 9)
            })
        );
        assert_eq!(
            at(2),
            Some(Position {
                line: 8,
                span: span(8, 29, 31)
            })
        );
        assert_eq!(
            at(3),
            Some(Position {
                line: 10,
                span: span(11, 4, 11)
            })
        );
        assert_eq!(
            at(4),
            Some(Position {
                line: 10,
                span: None
            })
        );
        // Before 3.11 there are lines only.
        let lnotab = LineTable::Lnotab.position_at(&[6, 1], 10, 8);
        assert_eq!(
            lnotab,
            Some(Position {
                line: 11,
                span: None
            })
        );
    }

    #[test]
    fn damaged_tables_give_no_line_rather_than_a_wrong_one() {
        // A continuation byte where an entry should start, and a table cut inside an entry.
        assert_eq!(LineTable::Locations.line_at(&[0x05, 0x80], 1, 0), None);
        assert_eq!(
            LineTable::Locations.line_at(&entry(14, 1, &[4]), 1, 0),
            None
        );
        assert_eq!(LineTable::Locations.line_at(&[], 1, 0), None);
        // Lines at or below zero are no lines.
        assert_eq!(LineTable::Lnotab.line_at(&[2, 0x80], 1, 4), None);
    }
}
