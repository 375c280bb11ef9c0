# Optional: build the models with clang (cmake -DCMAKE_TOOLCHAIN_FILE=abi/toolchain.cmake).
set(CMAKE_C_COMPILER clang)
set(CMAKE_CXX_COMPILER clang++)
