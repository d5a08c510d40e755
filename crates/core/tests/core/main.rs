//! The runner core through its library, without stage kinds: the HTML report. One test binary,
//! without libtorch (checked below).
#[path = "../../../../tests/support/linkage.rs"]
mod linkage;

mod report_page;

#[test]
fn this_test_binary_links_no_libtorch() {
    linkage::assert_this_test_binary_links_no_libtorch();
}
